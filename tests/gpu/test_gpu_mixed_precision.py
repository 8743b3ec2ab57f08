"""Each trainer's `compute_loss` on one collated batch with the same weights on the device under test, once in
float32 and once under the bf16 autocast its accelerator applies when `bf16=True` (as `train()` wraps the forward):
both finite, and within bf16's rounding of each other."""

import math

import pytest
import torch
from device_runs import device_run_args, linear_output_dtypes
from helpers import first_batch

from trl_offline import ALoLConfig, ALoLTrainer, DROConfig, DROTrainer, IQLearnConfig, IQLearnTrainer
from trl_offline.offline_kit import make_dataset, make_scored_dataset


pytestmark = pytest.mark.gpu

# bf16 rounds every matmul output to 8 significant bits (~0.4%); a loss averages such errors over the batch's tokens
RELATIVE_TOLERANCE = 2e-2


def losses_in_both_precisions(trainer) -> tuple[float, float]:
    """The loss of the first batch in float32 and under the trainer's bf16 autocast, each checked to have run in
    that precision."""
    assert trainer.accelerator.mixed_precision == "bf16"
    batch = first_batch(trainer)
    with torch.no_grad():
        with linear_output_dtypes(trainer.model) as float32_dtypes:
            float32_loss = trainer.compute_loss(trainer.model, batch)
        with linear_output_dtypes(trainer.model) as bf16_dtypes, trainer.accelerator.autocast():
            bf16_loss = trainer.compute_loss(trainer.model, batch)
    assert float32_dtypes == {torch.float32} and bf16_dtypes == {torch.bfloat16}
    assert float32_loss.device.type == bf16_loss.device.type == trainer.args.device.type
    return float32_loss.item(), bf16_loss.item()


def assert_close_losses(trainer) -> None:
    float32_loss, bf16_loss = losses_in_both_precisions(trainer)
    assert math.isfinite(float32_loss) and math.isfinite(bf16_loss), (float32_loss, bf16_loss)
    assert bf16_loss == pytest.approx(float32_loss, rel=RELATIVE_TOLERANCE)


def test_iqlearn_loss_in_bf16_matches_float32(device, tmp_path, warm_start_model_path):
    args = IQLearnConfig(**device_run_args(device, tmp_path, bf16=True, per_device_train_batch_size=8))
    trainer = IQLearnTrainer(warm_start_model_path, args=args, train_dataset=make_dataset("prompt_completion", 16))
    assert_close_losses(trainer)


def test_alol_loss_in_bf16_matches_float32(device, tmp_path, warm_start_model_path):
    args = ALoLConfig(**device_run_args(device, tmp_path, bf16=True, per_device_train_batch_size=8))
    dataset = make_scored_dataset("prompt_completion", 16)
    assert_close_losses(ALoLTrainer(warm_start_model_path, args=args, train_dataset=dataset))


@pytest.mark.parametrize("value_network", ["separate", "policy_head"])
def test_dro_loss_in_bf16_matches_float32(device, tmp_path, warm_start_model_path, value_network):
    overrides = dict(bf16=True, per_device_train_batch_size=8, value_network=value_network)
    args = DROConfig(**device_run_args(device, tmp_path, **overrides))
    dataset = make_scored_dataset("prompt_completion", 16)
    assert_close_losses(DROTrainer(warm_start_model_path, args=args, train_dataset=dataset))
