"""The policy and DRO's value network as one module, so that `Trainer`, `accelerate`, DeepSpeed and FSDP see a single
model.

The value network rides on the policy as its submodule `dro_value`: the engine that DDP, DeepSpeed ZeRO-1/2/3 or FSDP
builds around the policy then holds both, shards both, reduces both gradients, clips them together, and writes both
into its checkpoints, with gradient accumulation unchanged.

The policy's `forward` is left as it is (TRL's fused LM head patches it); module hooks add the value instead. Calling
the policy with one more keyword, `value_prompt_mask`, returns a `PolicyValueOutput`: the policy's own output and
`V(x)`. A forward pre-hook takes the keyword out before the forward sees it, and a forward hook computes `V(x)` and
wraps the output. Hooks run inside the module's `__call__`, so within the engine's forward: the value's parameters
are used there, which DDP's unused-parameter search and ZeRO-3's parameter gathering both need.

The checkpoint of the policy stays a plain causal LM (or adapter) because `DROTrainer._save` hands its
`save_pretrained` a state dict without the value's keys (see `without_value`) and writes the value in a `value/`
subfolder instead; a `save_pretrained` called directly on the policy writes the `dro_value.` weights with it.
"""

import contextlib
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .._trl_compat import active_adapter_layers, disable_gradient_checkpointing
from .value_networks import AdapterValueHead, PromptEndValueHead


VALUE_ATTR = "dro_value"
_VALUE_PREFIX = f"{VALUE_ATTR}."


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

    `gradient_checkpointing_kwargs` are those training uses, to restore checkpointing after a value adapter's pass.
    """
    policy.add_module(VALUE_ATTR, value_model)
    hooks = _ValueHooks(gradient_checkpointing_kwargs)
    policy.register_forward_pre_hook(hooks.take_prompt_mask, with_kwargs=True)
    # Called after a forward that raised too, so that no hook or tensor of that call stays behind
    policy.register_forward_hook(hooks.add_values, with_kwargs=True, always_call=True)


def value_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The value network's entries of a state dict of the whole model (under any wrapper prefix), with its prefix
    removed."""
    return {key.partition(_VALUE_PREFIX)[2]: value for key, value in state_dict.items() if _VALUE_PREFIX in key}


def without_value(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict of the whole model (under any wrapper prefix) without the value network's entries: the policy's."""
    return {key: value for key, value in state_dict.items() if not is_value_key(key)}


def is_value_key(key: str) -> bool:
    """Whether a key of the whole model's state dict (under any wrapper prefix) is the value network's."""
    return _VALUE_PREFIX in key


class _ValueHooks:
    """The hooks behind `policy(..., value_prompt_mask=mask)`. They share the state of one call: the mask, and what a
    one-shot hook on the policy's transformer body records during the forward (its last hidden state, and the autocast
    in force there). The policy and the value network are read from the hooked module on each call, never held."""

    def __init__(self, gradient_checkpointing_kwargs: dict | None):
        self.gradient_checkpointing_kwargs = gradient_checkpointing_kwargs
        self._prompt_mask: torch.Tensor | None = None
        self._body: dict = {}
        self._body_hook = None

    def take_prompt_mask(self, policy, args, kwargs):
        """Forward pre-hook: takes `value_prompt_mask` out of the keywords, which the policy's forward does not know."""
        self._reset()  # a call that raised under `torch.compile` skips the always-called hook
        self._prompt_mask = kwargs.pop("value_prompt_mask", None)
        if self._prompt_mask is not None:
            self._body_hook = policy.base_model.register_forward_hook(self._read_body)
        return args, kwargs

    def _read_body(self, body, args, output) -> None:
        # Only the policy's own pass: a value adapter's pass through the same body comes later, and must not count
        self._body_hook.remove()
        hidden_states = output.last_hidden_state  # (B, T, H)
        device_type = hidden_states.device.type
        autocast = contextlib.nullcontext()  # a device without autocast
        if torch.amp.is_autocast_available(device_type):
            autocast = torch.autocast(
                device_type,
                dtype=torch.get_autocast_dtype(device_type),
                enabled=torch.is_autocast_enabled(device_type),
                cache_enabled=torch.is_autocast_cache_enabled(),
            )
        self._body = {"hidden_states": hidden_states, "autocast": autocast}

    def add_values(self, policy, args, kwargs, output):
        """Forward hook: with a prompt mask, `PolicyValueOutput(output, V(x))`; otherwise the output as it is."""
        prompt_mask, body = self._prompt_mask, self._body
        self._reset()
        if prompt_mask is None or output is None:  # no output: the forward raised, and the state is cleared
            return None
        if not body:
            raise RuntimeError(
                "DRO's value network reads the policy's transformer body (`policy.base_model`), but the policy's forward "
                "never ran it."
            )
        # Under the autocast the forward ran under: a mixed-precision wrapper (accelerate's) may patch the policy's
        # `forward`, and hooks run outside it
        with body["autocast"]:
            values = self._prompt_values(policy, kwargs, prompt_mask, body["hidden_states"])
        return PolicyValueOutput(output, values)

    def _prompt_values(self, policy, kwargs: dict, prompt_mask: torch.Tensor, hidden_states: torch.Tensor):
        """`V(x)`, `(B,)`, from the value network riding on `policy`."""
        value_model = getattr(policy, VALUE_ATTR)
        if type(value_model) is PromptEndValueHead:
            return value_model(hidden_states, prompt_mask)
        # Causal attention: the prompt's states do not depend on the completion, so the value reads a forward over
        # the prompts alone, cut to the longest one
        prompt_length = int(prompt_mask.sum(-1).max())
        input_ids = kwargs["input_ids"][:, :prompt_length]  # (B, P)
        prompt_mask = prompt_mask[:, :prompt_length]  # (B, P)
        if isinstance(value_model, AdapterValueHead):
            # Not checkpointed: a recomputation in the backward pass would run with the policy's adapter active
            with (
                active_adapter_layers(policy, value_model.adapter_name),
                disable_gradient_checkpointing(policy, self.gradient_checkpointing_kwargs),
            ):
                hidden = policy.base_model(input_ids=input_ids, attention_mask=prompt_mask).last_hidden_state
            return value_model(hidden, prompt_mask)
        return value_model(input_ids, prompt_mask)

    def _reset(self) -> None:
        if self._body_hook is not None:
            self._body_hook.remove()  # removing twice is harmless
        self._prompt_mask, self._body, self._body_hook = None, {}, None
