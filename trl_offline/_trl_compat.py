"""The one place where `trl_offline` reaches into names TRL (or PEFT) does not export publicly.

If a release moves one of these, this file is the only one to change.
"""

import contextlib

from trl.data_utils import _tokenize as tokenize
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.base_config import _BaseConfig as BaseConfig
from trl.trainer.base_trainer import _BaseTrainer as BaseTrainer
from trl.trainer.utils import (
    add_fused_lm_head,
    create_model_from_path,
    disable_dropout_in_model,
    get_callable_name,
    get_config_model_id,
    hash_module,
    maybe_gather_lm_head_ctx,
    pad,
    use_adapter,
)


@contextlib.contextmanager
def active_adapter_layers(model, adapter_name: str):
    """Runs the PEFT layers inside `model` with only `adapter_name` active. PEFT's public `set_adapter` would also
    freeze every other adapter (`requires_grad=False`), which breaks a step that trains two adapters, one per forward;
    this sets the layers' private `_active_adapter` and nothing else."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
    previous = [layer._active_adapter for layer in layers]
    for layer in layers:
        layer._active_adapter = [adapter_name]
    try:
        yield
    finally:
        for layer, active in zip(layers, previous):
            layer._active_adapter = active


__all__ = [
    "active_adapter_layers",
    "BaseConfig",
    "BaseTrainer",
    "add_fused_lm_head",
    "create_model_from_path",
    "disable_dropout_in_model",
    "disable_gradient_checkpointing",
    "get_callable_name",
    "get_config_model_id",
    "hash_module",
    "maybe_gather_lm_head_ctx",
    "pad",
    "tokenize",
    "use_adapter",
]
