"""The one place where `trl_offline` reaches into names TRL does not export publicly.

If a TRL release moves one of these, this file is the only one to change.
"""

from trl.data_utils import _tokenize as tokenize
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.base_config import _BaseConfig as BaseConfig
from trl.trainer.base_trainer import _BaseTrainer as BaseTrainer
from trl.trainer.utils import (
    add_fused_lm_head,
    create_model_from_path,
    disable_dropout_in_model,
    get_callable_name,
    hash_module,
    maybe_gather_lm_head_ctx,
    pad,
    use_adapter,
)


__all__ = [
    "BaseConfig",
    "BaseTrainer",
    "add_fused_lm_head",
    "create_model_from_path",
    "disable_dropout_in_model",
    "disable_gradient_checkpointing",
    "get_callable_name",
    "hash_module",
    "maybe_gather_lm_head_ctx",
    "pad",
    "tokenize",
    "use_adapter",
]
