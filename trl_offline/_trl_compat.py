"""The one place where `trl_offline` reaches into names TRL does not export publicly.

If a TRL release moves one of these, this file is the only one to change.
"""

from trl.trainer.utils import get_callable_name, maybe_gather_lm_head_ctx


__all__ = ["get_callable_name", "maybe_gather_lm_head_ctx"]
