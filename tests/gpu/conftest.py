"""The device the `gpu` tests run on: CUDA by default, or the one `TRL_OFFLINE_TEST_DEVICE` names (`cpu` proves them
on a machine without a GPU). Without CUDA, a CUDA run skips every test here before any model is built."""

import os
from pathlib import Path

import pytest
import torch


DEVICE_VARIABLE = "TRL_OFFLINE_TEST_DEVICE"
_HERE = Path(__file__).parent


def _requested_device() -> torch.device:
    return torch.device(os.environ.get(DEVICE_VARIABLE, "cuda"))


def _why_unavailable(device: torch.device) -> str | None:
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"needs a CUDA GPU (none is visible); set {DEVICE_VARIABLE}=cpu to run these tests on the CPU"
    return None


def pytest_collection_modifyitems(config, items):
    # Skipped at collection, so that a run without CUDA never builds the session fixtures (pretrained models) the
    # tests ask for; the `device` fixture skips too, for a test that is run some other way
    reason = _why_unavailable(_requested_device())
    if reason is None:
        return
    for item in items:
        if _HERE in item.path.parents:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device under test: `torch.device(os.environ.get("TRL_OFFLINE_TEST_DEVICE", "cuda"))`."""
    device = _requested_device()
    reason = _why_unavailable(device)
    if reason is not None:
        pytest.skip(reason)
    return device


@pytest.fixture(scope="session")
def warm_start_model_path(tmp_path_factory) -> str:
    """A tiny Llama after a short SFT warm start on the kit's sorting answers (on the CPU, a few seconds; the suite's
    `pretrained_tiny_model_path` trains 5x longer, which takes tens of seconds on two cores). Its logits are peaked
    like a trained model's, which is where bf16 rounding shows, and its answers vary in quality."""
    from helpers import pretrain_tiny_model

    return pretrain_tiny_model(tmp_path_factory.mktemp("warm-start-tiny-llama"), steps=30, batch_size=16)


@pytest.fixture(autouse=True)
def full_float32_matmuls():
    """Float32 means float32 here: a TF32 matmul (on if something set `set_float32_matmul_precision("high")`) keeps
    10 mantissa bits, and would break the float32 tolerances."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)
