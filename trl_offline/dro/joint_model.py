"""The policy and DRO's value network as one module, so that `Trainer`, `accelerate` and DeepSpeed see a single model.

The value network rides on the policy as its submodule `dro_value`: the engine that DDP or DeepSpeed ZeRO-1/2/3 builds
around the policy then holds both, shards both, reduces both gradients, clips them together, and writes both into
its checkpoints, with gradient accumulation unchanged. The policy's forward gains one keyword, `value_prompt_mask`;
with it, the same forward call returns a `PolicyValueOutput`: the policy's own output and `V(x)`. So the value's
parameters are used inside the engine's forward, which DDP's unused-parameter search and ZeRO-3's parameter gathering
both need.

The policy's checkpoint stays a plain causal LM: the value's weights are listed in `_keys_to_ignore_on_save`, so every
`save_pretrained` of the policy leaves them out, and the trainer writes them in a `value/` subfolder instead.
"""

import contextlib
import functools
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .._trl_compat import active_adapter_layers, disable_gradient_checkpointing
from ..value import AdapterValueHead, PromptEndValueHead


VALUE_ATTR = "dro_value"


@dataclass
class PolicyValueOutput(ModelOutput):
    """What the policy's forward returns when asked for values: its own output, and `V(x)`.

    A new output type rather than a key added to the policy's: DDP rebuilds output dataclasses from their fields.
    """

    policy: ModelOutput | None = None
    prompt_values: torch.Tensor | None = None  # (B,), float32: V(x); not `values`, which would hide the dict method


def attach_value_model(
    policy: PreTrainedModel, value_model: PromptEndValueHead, gradient_checkpointing_kwargs: dict | None = None
) -> None:
    """Makes `value_model` a submodule of `policy` and lets `policy(..., value_prompt_mask=mask)` compute `V(x)`.

    Call after any other patch of `policy.forward` (e.g. TRL's fused LM head), so that this one wraps them.
    `gradient_checkpointing_kwargs` are those training uses, to restore checkpointing after a value adapter's pass.
    """
    policy.add_module(VALUE_ATTR, value_model)
    ignored = {f"{VALUE_ATTR}.{name}" for name in value_model.state_dict()}
    policy._keys_to_ignore_on_save = set(policy._keys_to_ignore_on_save or ()) | ignored
    inner_forward = policy.forward

    @functools.wraps(inner_forward)
    def forward(*args, value_prompt_mask: torch.Tensor | None = None, **kwargs):
        if value_prompt_mask is None:
            return inner_forward(*args, **kwargs)
        reads_policy_states = type(value_model) is PromptEndValueHead
        with _captured_last_hidden_state(policy, enabled=reads_policy_states) as captured:
            outputs = inner_forward(*args, **kwargs)
        if reads_policy_states:
            return PolicyValueOutput(outputs, value_model(captured["hidden_states"], value_prompt_mask))
        # Causal attention: the prompt's states do not depend on the completion, so the value reads a forward over
        # the prompts alone, cut to the longest one
        prompt_length = int(value_prompt_mask.sum(-1).max())
        input_ids = kwargs["input_ids"][:, :prompt_length]  # (B, P)
        prompt_mask = value_prompt_mask[:, :prompt_length]  # (B, P)
        if isinstance(value_model, AdapterValueHead):
            # Not checkpointed: a recomputation in the backward pass would run with the policy's adapter active
            with (
                active_adapter_layers(policy, value_model.adapter_name),
                disable_gradient_checkpointing(policy, gradient_checkpointing_kwargs),
            ):
                hidden = policy.base_model(input_ids=input_ids, attention_mask=prompt_mask).last_hidden_state
            return PolicyValueOutput(outputs, value_model(hidden, prompt_mask))
        return PolicyValueOutput(outputs, value_model(input_ids, prompt_mask))

    policy.forward = forward


def value_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The value network's entries of a state dict of the whole model (under any wrapper prefix), with its prefix
    removed."""
    marker = f"{VALUE_ATTR}."
    return {key.partition(marker)[2]: value for key, value in state_dict.items() if marker in key}


@contextlib.contextmanager
def _captured_last_hidden_state(policy: PreTrainedModel, enabled: bool):
    """Records the output of the policy's transformer body, `{"hidden_states": (B, T, H)}`, during the forward."""
    captured: dict[str, torch.Tensor] = {}
    if not enabled:
        yield captured
        return

    def hook(module, args, output):
        captured["hidden_states"] = output.last_hidden_state

    handle = policy.base_model.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()
