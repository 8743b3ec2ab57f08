"""What [`OfflineRLTrainer`] logs and evaluates per row: metrics summed over every row and process since the last
log, what the precompute measured (logged as step 0), and each evaluation row's log-probabilities and value for
`compute_metrics`."""

from collections import defaultdict

import torch
from transformers import TrainerCallback


def _pearson(n: float, x: float, y: float, xx: float, yy: float, xy: float) -> float:
    """Pearson's correlation from the sums of `1, x, y, x^2, y^2, x * y` over rows; NaN when either is constant."""
    covariance = xy / n - (x / n) * (y / n)
    variance_x, variance_y = xx / n - (x / n) ** 2, yy / n - (y / n) ** 2
    if variance_x <= 1e-12 * max(1.0, xx / n) or variance_y <= 1e-12 * max(1.0, yy / n):
        return float("nan")
    return covariance / (variance_x * variance_y) ** 0.5


class LogAtTrainBegin(TrainerCallback):
    """Logs what was measured before training (the value head's fit, the positive fraction) as step 0."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer.precompute_metrics:
            self.trainer.log(dict(self.trainer.precompute_metrics))


class RowMetricsMixin:
    """Per-row metrics and evaluation predictions of [`OfflineRLTrainer`]; `_init_row_metrics` starts the totals."""

    # What `compute_metrics` receives per evaluation row, in this order, with the row's reward as `label_ids`
    PREDICTION_COLUMNS = ("logp", "ref_logp", "value")

    def _init_row_metrics(self) -> None:
        self._metric_totals = {"train": defaultdict(float), "eval": defaultdict(float)}
        self._metric_denominators: dict[str, str] = {}
        self._metric_correlations: set[str] = set()
        self.precompute_metrics: dict[str, float] = {}
        self.add_callback(LogAtTrainBegin(self))

    def log_row_metrics(
        self,
        mode: str,
        rows: dict[str, torch.Tensor],
        denominators: dict[str, str],
        correlations: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        """Adds per-row metrics to the totals of the next log, over every process, with one gather.

        `rows` maps names to `(B,)` tensors, one value per row, that are summed; `denominators` maps each reported
        metric to the name whose total divides it (e.g. `"reward/mean": "rows"`). `correlations` maps a reported
        name to two `(B,)` tensors whose Pearson correlation over the same rows is logged (from summed moments).
        Totals run over every batch since the last log, so a short batch weighs as many rows as it has.
        """
        rows = dict(rows)
        for name, (x, y) in (correlations or {}).items():
            x, y = x.detach().float(), y.detach().float()
            moments = {"n": torch.ones_like(x), "x": x, "y": y, "xx": x * x, "yy": y * y, "xy": x * y}
            rows.update({f"{name}#{key}": value for key, value in moments.items()})
            self._metric_correlations.add(name)
        keys = list(rows)
        per_row = torch.stack([rows[key].float() for key in keys], dim=1)  # (B, K)
        # One entry per sample, so that `gather_for_metrics` drops the samples repeated to even out the last batch
        totals = self.accelerator.gather_for_metrics(per_row).sum(0).tolist()  # (K,)
        for key, total in zip(keys, totals):
            self._metric_totals[mode][key] += total
        self._metric_denominators.update(denominators)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        totals = self._metric_totals[mode]
        metrics = {
            key: totals[key] / totals[denominator]
            for key, denominator in self._metric_denominators.items()
            if totals.get(denominator)
        }
        for name in self._metric_correlations:
            if totals.get(f"{name}#n"):
                metrics[name] = _pearson(*(totals[f"{name}#{key}"] for key in ("n", "x", "y", "xx", "yy", "xy")))
        if mode == "eval":
            metrics = {f"eval_{key}": value for key, value in metrics.items()}
        logs.update(metrics)  # in place: `evaluate` returns the dict it logged
        super().log(logs, start_time)
        totals.clear()

    @staticmethod
    def row_predictions(logps: torch.Tensor, ref_logps: torch.Tensor, values: torch.Tensor) -> dict:
        """`compute_loss`'s outputs for evaluation: `(B, 3)` per row, the columns of `PREDICTION_COLUMNS`:
        `log pi(y|x)`, `log pi_ref(y|x)` (sums over the completion) and `V(x)`."""
        return {"row_predictions": torch.stack([logps.float(), ref_logps.float(), values.float()], dim=1)}

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The loss, and unless only the loss is asked for (no `compute_metrics`), each row's `PREDICTION_COLUMNS`
        `(B, 3)` as predictions and its reward `(B,)` as labels, gathered over processes by the evaluation loop."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        return loss.detach(), outputs["row_predictions"], inputs["reward"].float()
