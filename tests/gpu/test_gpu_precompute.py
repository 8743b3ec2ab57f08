"""A-LoL's and DRO's passes before training on the device under test (the reference's log-probability of each row,
and with A-LoL's `"alol_seq"` of each of its tokens; A-LoL's value `V_ref(x)` and advantage), against the same
trainer built on the CPU in float32, row by row: every row carries a `row_id`, so a value that lands on another row
fails. The CPU side is itself checked against a forward of each row alone."""

import pytest
import torch
from datasets import Dataset
from device_runs import device_run_args

from trl_offline import ALoLConfig, ALoLTrainer, DROConfig, DROTrainer
from trl_offline.offline_kit import make_scored_dataset


pytestmark = pytest.mark.gpu

NUM_ROWS = 22  # passes in batches of 4 and a last one of 2: padded rows and a ragged end
CPU = torch.device("cpu")

# Float32 on the device against the CPU: the same arithmetic, summed in another order by other kernels
FLOAT32 = dict(rtol=1e-4, atol=1e-4)
# bf16 autocast rounds each logit to 8 significant bits (~0.4%); a row's log-probability sums ~10 tokens' errors
BF16_LOGP = dict(rtol=1e-2, atol=1e-1)
# A-LoL's value head runs in float32 (autocast off) on prompt features that bf16 matmuls rounded
BF16_VALUE = dict(rtol=0, atol=1e-2)


def scored_rows() -> Dataset:
    rows = make_scored_dataset("prompt_completion", NUM_ROWS)
    return rows.add_column("row_id", list(range(NUM_ROWS)))


def by_row(dataset: Dataset, columns: list[str]) -> dict[int, dict]:
    """Each row of `dataset` under its `row_id`."""
    return {row["row_id"]: row for row in dataset.select_columns(["row_id", *columns])}


def column(rows: dict[int, dict], name: str) -> torch.Tensor:
    """`name` of every row, in row-id order."""
    return torch.tensor([rows[row_id][name] for row_id in sorted(rows)], dtype=torch.float64)


def build(trainer_class, config_class, path, device, output_dir, bf16: bool):
    # A-LoL's "alol_seq" keeps the per-token log-probabilities too, a superset of what the other variants precompute
    overrides = {"loss_type": "alol_seq"} if trainer_class is ALoLTrainer else {}
    args = config_class(**device_run_args(device, output_dir, bf16=bf16, **overrides))
    return trainer_class(path, args=args, train_dataset=scored_rows())


def tokens(rows: dict[int, dict]) -> torch.Tensor:
    """Every row's per-token `ref_logps`, in row-id order, end to end."""
    return torch.tensor([logp for row_id in sorted(rows) for logp in rows[row_id]["ref_logps"]], dtype=torch.float64)


@pytest.fixture(scope="module")
def cpu_alol(warm_start_model_path, tmp_path_factory):
    return build(ALoLTrainer, ALoLConfig, warm_start_model_path, CPU, tmp_path_factory.mktemp("alol-cpu"), False)


@pytest.fixture(scope="module")
def cpu_dro(warm_start_model_path, tmp_path_factory):
    return build(DROTrainer, DROConfig, warm_start_model_path, CPU, tmp_path_factory.mktemp("dro-cpu"), False)


@torch.no_grad()
def test_cpu_precompute_is_each_rows_own(cpu_alol, cpu_dro):
    # Anchors the CPU side of the comparisons: each row's numbers are those of a forward of that row alone
    model, value_head = cpu_alol.model, cpu_alol.value_head
    columns = ["prompt_ids", "completion_ids", "reward", "ref_logp", "ref_logps", "value", "advantage"]
    rows = by_row(cpu_alol._scored_train, columns)
    assert sorted(rows) == list(range(NUM_ROWS))
    dro_rows = by_row(cpu_dro.train_dataset, ["ref_logp"])
    for row_id, row in rows.items():
        prompt, completion = row["prompt_ids"], row["completion_ids"]
        ids = torch.tensor([prompt + completion])  # (1, T)
        logps = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)  # (T - 1, V)
        token_logps = logps.gather(-1, ids[0, 1:, None]).squeeze(-1)  # (T - 1,) position t scores token t + 1
        completion_logps = token_logps[len(prompt) - 1 :]  # (T_completion,)
        ref_logp = completion_logps.sum().item()
        hidden = model.model(input_ids=torch.tensor([prompt])).last_hidden_state  # (1, T_prompt, H)
        value = value_head(hidden, torch.ones(1, len(prompt), dtype=torch.long)).item()
        assert row["ref_logp"] == pytest.approx(ref_logp, abs=1e-4), row_id
        assert row["ref_logps"] == pytest.approx(completion_logps.tolist(), abs=1e-5), row_id
        assert dro_rows[row_id]["ref_logp"] == pytest.approx(ref_logp, abs=1e-4), row_id
        assert row["value"] == pytest.approx(value, abs=1e-5), row_id
        assert row["advantage"] == pytest.approx(row["reward"] - value, abs=1e-5), row_id


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16"])
def test_alol_precompute_on_the_device_matches_the_cpu(device, tmp_path, warm_start_model_path, cpu_alol, bf16):
    trainer = build(ALoLTrainer, ALoLConfig, warm_start_model_path, device, tmp_path, bf16)
    assert all(p.device.type == device.type for p in trainer.value_head.parameters())
    columns = ["reward", "ref_logp", "ref_logps", "value", "advantage"]
    got, want = by_row(trainer._scored_train, columns), by_row(cpu_alol._scored_train, columns)
    assert sorted(got) == sorted(want) == list(range(NUM_ROWS))

    logp_tolerance, value_tolerance = (BF16_LOGP, BF16_VALUE) if bf16 else (FLOAT32, FLOAT32)
    torch.testing.assert_close(column(got, "ref_logp"), column(want, "ref_logp"), **logp_tolerance)
    assert [len(got[r]["ref_logps"]) for r in sorted(got)] == [len(want[r]["ref_logps"]) for r in sorted(want)]
    torch.testing.assert_close(tokens(got), tokens(want), **logp_tolerance)
    epochs = [t.precompute_metrics["value/best_epoch"] for t in (trainer, cpu_alol)]
    torch.testing.assert_close(
        column(got, "value"), column(want, "value"), **value_tolerance, msg=lambda m: f"{m}\nbest epochs: {epochs}"
    )
    torch.testing.assert_close(column(got, "reward"), column(want, "reward"), rtol=0, atol=0)
    advantages = column(got, "advantage")
    torch.testing.assert_close(advantages, column(got, "reward") - column(got, "value"), rtol=0, atol=1e-6)

    # Training runs on the rows whose own advantage is positive; they are the CPU's, but for rows whose A is within
    # the value's tolerance of 0, where rounding may flip its sign
    positive = [row_id for row_id in sorted(got) if got[row_id]["advantage"] > 0]
    assert sorted(trainer.train_dataset["row_id"]) == positive
    margin = {r: value_tolerance["atol"] + value_tolerance["rtol"] * abs(want[r]["value"]) for r in want}
    clear = [row_id for row_id in sorted(want) if abs(want[row_id]["advantage"]) > margin[row_id]]
    assert [r for r in clear if r in positive] == [r for r in clear if want[r]["advantage"] > 0]


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16"])
def test_dro_precompute_on_the_device_matches_the_cpu(device, tmp_path, warm_start_model_path, cpu_dro, bf16):
    trainer = build(DROTrainer, DROConfig, warm_start_model_path, device, tmp_path, bf16)
    columns = ["reward", "ref_logp"]
    got, want = by_row(trainer.train_dataset, columns), by_row(cpu_dro.train_dataset, columns)
    assert sorted(got) == sorted(want) == list(range(NUM_ROWS))
    torch.testing.assert_close(column(got, "ref_logp"), column(want, "ref_logp"), **(BF16_LOGP if bf16 else FLOAT32))
    # Standardised over the training rows, with the same statistics
    torch.testing.assert_close(column(got, "reward"), column(want, "reward"), rtol=0, atol=1e-12)
