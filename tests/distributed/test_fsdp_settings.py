"""FSDP settings the trainers that precompute cannot honour are refused before training, in a one-process FSDP2 world
on the CPU (see cpu_fsdp.py)."""

import os
import socket

import pytest
import torch.distributed as dist
from accelerate.state import AcceleratorState
from cpu_fsdp import enable_fsdp_on_cpu
from helpers import cpu_run_args

from trl_offline import ALoLConfig, ALoLTrainer, DROConfig, DROTrainer
from trl_offline.offline_kit import make_scored_dataset


@pytest.fixture
def one_process_fsdp_world(monkeypatch):
    """A one-process gloo world in which accelerate keeps its FSDP plugin; undone afterwards (the environment too:
    `TrainingArguments(fsdp=...)` exports `ACCELERATE_USE_FSDP` and its settings, which later trainers would read)."""
    from accelerate import state

    environment = dict(os.environ)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_PORT=str(port))
    for key, value in {**world, "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(state.AcceleratorState, "__init__", state.AcceleratorState.__init__)  # restored after
    enable_fsdp_on_cpu()
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(environment)


@pytest.mark.parametrize("trainer_class,config_class", [(ALoLTrainer, ALoLConfig), (DROTrainer, DROConfig)])
def test_ram_efficient_loading_is_refused(
    tmp_path, tiny_model_path, one_process_fsdp_world, trainer_class, config_class
):
    # With it, only the first process loads the weights, and FSDP shares them out when training starts: the reference
    # passes before training would run on empty weights everywhere else
    fsdp = dict(fsdp="full_shard", fsdp_config={"fsdp_version": 2, "cpu_ram_efficient_loading": True})
    args = config_class(**cpu_run_args(tmp_path, **fsdp))
    dataset = make_scored_dataset("prompt_completion", 8, score="label")
    with pytest.raises(ValueError, match="turn off `cpu_ram_efficient_loading`"):
        trainer_class(tiny_model_path, args=args, train_dataset=dataset)


def test_a_trainer_after_them_runs_without_fsdp(tmp_path, tiny_model_path):
    # Nothing of the FSDP world above is left for the next test
    args = ALoLConfig(**cpu_run_args(tmp_path, max_steps=1))
    trainer = ALoLTrainer(tiny_model_path, args=args, train_dataset=make_scored_dataset("prompt_completion", 8))
    assert not trainer.is_fsdp_enabled and not dist.is_initialized()
    assert "ACCELERATE_USE_FSDP" not in os.environ
