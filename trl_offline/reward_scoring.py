"""`reward_funcs` in [`OfflineRLTrainer`]: loaded and prepared as TRL's GRPO prepares them, then every row scored
once, before training, each process taking its share of the rows (see [`trl_offline.rewards`] for the functions'
conventions)."""

import torch
from datasets import Dataset
from trl.models import prepare_deepspeed

from .rewards import load_reward_funcs, prepare_reward_funcs, rewards_fingerprint, score_batch


class RewardScoringMixin:
    """Rewards from `reward_funcs` for [`OfflineRLTrainer`]; the passes run through `map_rows` and are cached by
    `cached_columns` ([`ReferencePassesMixin`])."""

    def _set_reward_funcs(self, reward_funcs, reward_processing_classes, args) -> None:
        """`reward_funcs`, their tokenizers and weights, loaded (paths with `args.model_init_kwargs`) on the device."""
        self.reward_funcs, self.reward_processing_classes, self.reward_weights = None, None, None
        if reward_funcs is not None:
            self.reward_funcs, self.reward_processing_classes, self.reward_weights = prepare_reward_funcs(
                *load_reward_funcs(reward_funcs, reward_processing_classes, args.model_init_kwargs),
                args.reward_weights,
                args.device,
            )

    def with_rewards(self, dataset: Dataset, name: str) -> Dataset:
        """`dataset` with a `reward` column from `reward_funcs`, each process scoring its share of the rows (cached
        beside a file-backed dataset)."""
        if "reward" in dataset.column_names:  # already scored, e.g. passed back to `evaluate`
            return dataset
        unwrapped = [
            self.accelerator.unwrap_model(f) if isinstance(f, torch.nn.Module) else f for f in self.reward_funcs
        ]
        fingerprint = rewards_fingerprint(
            dataset, unwrapped, self.reward_processing_classes, self.reward_weights, "reward"
        )
        return self.cached_columns(dataset, fingerprint, lambda: {"reward": self.reward_funcs_scores(dataset, name)})

    def _prepare_reward_models(self) -> None:
        """Reward models ready for the distributed passes, as TRL's GRPO prepares them: under ZeRO-3 they were loaded
        sharded, so each runs in an inference engine (every process takes part in every forward: the passes give
        them the same number of batches)."""
        for i, reward_func in enumerate(self.reward_funcs):
            if isinstance(reward_func, torch.nn.Module):
                if self.is_deepspeed_enabled:
                    self.reward_funcs[i] = prepare_deepspeed(reward_func, self.accelerator)
                else:
                    self.reward_funcs[i] = self.accelerator.prepare_model(
                        reward_func, evaluation_mode=True, device_placement=True
                    )

    def reward_funcs_scores(self, dataset: Dataset, name: str) -> list[float]:
        """The `reward_funcs` score of every row of `dataset` (`prompt`, `completion` and the other columns)."""
        text_columns = [c for c in dataset.column_names if c not in ("prompt_ids", "completion_ids")]
        rows = dataset.select_columns(text_columns)

        def score(indices: list[int]) -> dict[str, torch.Tensor]:
            rewards = score_batch(
                rows[indices],
                indices[0],
                self.reward_funcs,
                self.reward_processing_classes,
                self.reward_weights,
                self.args.device,
            )
            return {"reward": torch.tensor(rewards, dtype=torch.float64)}

        return self.map_rows(len(rows), score, self._reward_batch_size(), f"Scoring the {name} rows")["reward"]

    def _reward_batch_size(self) -> int:
        return self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size
