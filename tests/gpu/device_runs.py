"""What the `gpu` tests share: the config of a short run on the device under test, and a record of the precision the
model's layers computed in."""

import contextlib

import torch
from helpers import cpu_run_args


def device_run_args(device: torch.device, output_dir, **overrides) -> dict:
    """`cpu_run_args` (a short, quiet run) on `device`: `use_cpu` only on the CPU; `overrides` win."""
    return cpu_run_args(output_dir, **{"use_cpu": device.type == "cpu", **overrides})


def shipped_run_args(device: torch.device, output_dir, **overrides) -> dict:
    """A short run on `device` that keeps the method's shipped learning rate and gradient checkpointing: only the
    sizes, steps, device and logging are set; `overrides` win."""
    args = device_run_args(device, output_dir, **overrides)
    for key in ("learning_rate", "gradient_checkpointing"):
        if key not in overrides:
            del args[key]
    return args


@contextlib.contextmanager
def linear_output_dtypes(model: torch.nn.Module):
    """The dtypes of the outputs of the linear layers of `model`'s transformer body, as they run inside the block
    (bf16 under bf16 autocast, whatever the parameters' dtype)."""
    dtypes = set()
    layers = [m for m in model.get_decoder().modules() if isinstance(m, torch.nn.Linear)]
    hooks = [layer.register_forward_hook(lambda module, args, output: dtypes.add(output.dtype)) for layer in layers]
    try:
        yield dtypes
    finally:
        for hook in hooks:
            hook.remove()
