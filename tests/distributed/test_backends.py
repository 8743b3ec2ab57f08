"""Every trainer under 2-process DDP, DeepSpeed ZeRO-2 and ZeRO-3 (CPU, gloo), launched as users launch the recipes.

FSDP2 runs for real on CPU processes too, with accelerate's CPU restriction lifted in the test harness (cpu_fsdp.py).

For each trainer and backend: training runs to completion, both ranks end with the same weights (DRO's value network
included: it is part of the model), and the loss curve follows a single process given the same global batch (2 x 16
rows against 1 x 32). Under ZeRO-3 also: the reference passes run on sharded parameters (A-LoL's value-head fit, the
reference log-probs of A-LoL and DRO), the saved model is full, a resume from a checkpoint continues the same run, and
PEFT trains. `tests/recipes/test_alol_recipe.py` adds A-LoL's greedy generations under ZeRO-3. Tolerance on losses: 1e-3 relative (the reductions add in
another order; measured differences are below 1e-5).
"""

import functools
import json
import re
import tempfile

import pytest
from launch_utils import logged_steps, run_recipe
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from trl_offline.dro.value_networks import PromptValueModel
from trl_offline.iqlearn.soft_value import SOFT_VALUE_HEAD_FILE


TRAINERS = ("iqlearn", "alol", "dro")
BACKENDS = ("ddp_cpu", "zero2_cpu", "zero3_cpu")
HARNESS = "tests/distributed/run_with_digest.py"
RTOL = 1e-3


def _args(trainer: str, output_dir, *extra: str) -> list[str]:
    return [
        trainer,
        "--config", f"recipes/configs/{trainer}_tiny.yaml",
        "--max_steps", "4", "--warmup_steps", "0", "--logging_steps", "1",
        "--output_dir", str(output_dir),
        *extra,
    ]  # fmt: skip


def _losses(stdout: str) -> list[float]:
    return [float(log["loss"]) for log in logged_steps(stdout) if "loss" in log]


def _digests(stdout: str) -> dict[int, str]:
    return {int(rank): digest for rank, digest in re.findall(r"WEIGHT_DIGEST rank=(\d) ([0-9a-f]{64})", stdout)}


@functools.cache
def _single_process_losses(trainer: str) -> tuple[float, ...]:
    """The loss curve of one process with the global batch of two (32 rows), run once per trainer."""
    with tempfile.TemporaryDirectory() as output_dir:
        result = run_recipe(HARNESS, *_args(trainer, output_dir, "--per_device_train_batch_size", "32"))
    return tuple(_losses(result.stdout))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("trainer", TRAINERS)
def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path, trainer, backend):
    save = ["--save_strategy", "steps", "--save_steps", "2"] if backend == "zero3_cpu" else []
    result = run_recipe(HARNESS, *_args(trainer, tmp_path / "run", *save), accelerate_config=f"{backend}.yaml")
    losses = _losses(result.stdout)
    assert len(losses) == 4
    digests = _digests(result.stdout)
    assert set(digests) == {0, 1} and digests[0] == digests[1], digests  # both ranks hold the same weights
    assert losses == pytest.approx(_single_process_losses(trainer), rel=RTOL)
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "run"))  # a full model, gathered on save under ZeRO-3
    if trainer == "dro":  # and DRO's value network beside it
        PromptValueModel.from_pretrained(str(tmp_path / "run" / "value"))

    if backend == "zero3_cpu":
        # Resume from the step-2 checkpoint: the same last two losses and the same final weights
        checkpoint = str(tmp_path / "run" / "checkpoint-2")
        resumed = run_recipe(
            HARNESS,
            *_args(trainer, tmp_path / "resumed", "--resume_from_checkpoint", checkpoint),
            accelerate_config="zero3_cpu.yaml",
        )
        assert _losses(resumed.stdout) == pytest.approx(losses[2:], rel=RTOL)
        assert _digests(resumed.stdout) == digests


@pytest.mark.parametrize("trainer", TRAINERS)
def test_fsdp2_trains_like_one_process_with_the_same_global_batch(tmp_path, trainer):
    # Real FSDP2 on 2 CPU processes (see cpu_fsdp.py): the parameters are sharded DTensors, A-LoL's and DRO's
    # precompute runs before the model is sharded, and the losses follow one process
    fsdp = [
        "--fsdp",
        "full_shard",
        "--fsdp_config",
        json.dumps({"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}),
    ]
    result = run_recipe(
        HARNESS,
        *_args(trainer, tmp_path / "run", *fsdp),
        accelerate_config="ddp_cpu.yaml",
        env={"TRL_OFFLINE_TEST_CPU_FSDP": "1", "PYTHONPATH": "tests/distributed"},
    )
    sharded = dict(re.findall(r"FSDP2 rank=(\d) sharded=(\d+/\d+)", result.stdout))
    assert set(sharded) == {"0", "1"} and all(int(s.split("/")[0]) > 0 for s in sharded.values()), sharded
    digests = _digests(result.stdout)
    assert set(digests) == {0, 1} and digests[0] == digests[1], digests
    assert _losses(result.stdout) == pytest.approx(_single_process_losses(trainer), rel=RTOL)


@pytest.mark.parametrize("trainer", TRAINERS)
def test_peft_trains_under_zero3(tmp_path, trainer):
    lora = ["--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "q_proj", "v_proj"]
    result = run_recipe(HARNESS, *_args(trainer, tmp_path, *lora), accelerate_config="zero3_cpu.yaml")
    assert len(_losses(result.stdout)) == 4
    assert (tmp_path / "adapter_model.safetensors").is_file()
    digests = _digests(result.stdout)
    assert digests[0] == digests[1]


def test_iqlearn_packed_on_three_processes_trains_like_one(tmp_path, pretrained_tiny_bpe_model_path):
    # An SFT user's setting: a pretrained model with a byte-level BPE, packing on, IQLearn's shipped defaults (the
    # learned soft value), 3 DDP processes against one with the same global batch (3 x 4 packed rows against 12)
    packed = ["--model_name_or_path", pretrained_tiny_bpe_model_path, "--packing", "true"]
    one = run_recipe(HARNESS, *_args("iqlearn", tmp_path / "one", *packed, "--per_device_train_batch_size", "12"))
    three = run_recipe(
        HARNESS,
        *_args("iqlearn", tmp_path / "three", *packed, "--per_device_train_batch_size", "4"),
        accelerate_config="ddp_cpu.yaml",
        num_processes=3,
    )
    assert len(_losses(three.stdout)) == 4
    assert _losses(three.stdout) == pytest.approx(_losses(one.stdout), rel=RTOL)
    digests = _digests(three.stdout)
    assert set(digests) == {0, 1, 2} and len(set(digests.values())) == 1, digests  # the head included
    head = load_file(str(tmp_path / "three" / SOFT_VALUE_HEAD_FILE))
    assert any(weight.abs().sum() > 0 for weight in head.values())  # the zero-initialised value head trained
