"""A soft-Q head for a causal LM: `model(..., labels=labels, soft_q_head=True)` returns, at every scored position,
`Q(s_t, a_t)` (the taken token's logit) and `V(s_t)` (the logsumexp of the logits), never building the
`(batch, seq_len, vocab)` logits.

The statistics are computed inside the model's own forward, not in the trainer, because DDP and DeepSpeed ZeRO-3
arm their gradient hooks around `forward`: the LM-head weight must be read there for its gradient to be reduced.
Mixture-of-Experts models also return their load-balancing loss (`aux_loss`), as TRL's fused LM head does.

A learned state value `v_phi(s)` ([`SoftValueHead`], attached by [`add_soft_value_head`] as the submodule
`soft_value_head`) is computed in the same forward for the same reason: its weights must be used inside the
engine's forward for DDP to reduce their gradient and ZeRO-3 to gather them.
"""

import functools
import types
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor
from transformers.masking_utils import find_packed_sequence_indices
from transformers.utils import ModelOutput

from .._trl_compat import maybe_gather_lm_head_ctx
from .chunked_soft_q import chunked_soft_q_stats


@dataclass
class SoftQOutput(ModelOutput):
    """Per-position outputs of the soft-Q head, each `(batch, seq_len - 1)` and zero where `completion_mask` is 0.

    Args:
        target_logits: `Q(s_t, a_t)`, the logit of the next token.
        logsumexp: `V(s_t)`, the logsumexp of the logits.
        entropy: Entropy of the next-token distribution (no gradient).
        is_top1: Whether the next token is the most likely one.
        completion_mask: Whether the next token is scored (its label is not `-100`).
        state_values: `v_phi(s_t)` from the model's `soft_value_head`, if it has one (float32).
        next_state_values: `v_phi(s_{t+1})`, the value of the state right after the action at t, that is at the
            position of the scored token itself (float32); with the head only.
        segment_ids: For rows that hold several sequences (packing, padding-free), the index within its row of the
            sequence each state belongs to; `None` when every row is one sequence.
        aux_loss: The Mixture-of-Experts load-balancing loss, a scalar, when the router logits were asked for
            (`output_router_logits`); `None` otherwise.
    """

    target_logits: torch.Tensor | None = None
    logsumexp: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    completion_mask: torch.Tensor | None = None
    segment_ids: torch.Tensor | None = None
    state_values: torch.Tensor | None = None
    next_state_values: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


SOFT_VALUE_ATTR = "soft_value_head"  # the submodule's name; its keys start with `soft_value_head.`


class SoftValueHead(torch.nn.Module):
    """A learned state value `v_phi(s) = w . h_s + b` on the final hidden state, zero at initialisation.

    Args:
        hidden_size (`int`): Width of the model's final hidden states.
        backprop (`bool`, *optional*, defaults to `False`): Whether the value's gradient flows into the hidden states
            (and so into the model); by default the head reads them detached and trains alone.
    """

    def __init__(self, hidden_size: int, backprop: bool = False):
        super().__init__()
        # Built on the meta device: a zero initialisation needs no random numbers, so the global generator is left
        # as it would be without the head
        self.linear = torch.nn.Linear(hidden_size, 1, device="meta").to_empty(device="cpu")
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)
        self.backprop = backprop

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`(B, L, H)` hidden states to `(B, L)` float32 values."""
        if not self.backprop:
            hidden_states = hidden_states.detach()
        hidden_states = hidden_states.to(device=self.linear.weight.device, dtype=self.linear.weight.dtype)
        return self.linear(hidden_states).squeeze(-1).float()  # (B, L)


def add_soft_value_head(model: torch.nn.Module, backprop: bool = False) -> SoftValueHead:
    """Attach a zero-initialised [`SoftValueHead`] to `model` (the causal LM, under PEFT its base model) as its
    submodule `soft_value_head`, on the LM head's device and in its dtype, and return it. A head already there is
    kept (its weights are the state of a run being continued), with `backprop` set."""
    head = getattr(model, SOFT_VALUE_ATTR, None)
    if head is None:
        lm_head_weight = model.get_output_embeddings().weight
        dtype = lm_head_weight.dtype if lm_head_weight.dtype.is_floating_point else torch.float32
        head = SoftValueHead(model.config.get_text_config().hidden_size, backprop)
        model.add_module(SOFT_VALUE_ATTR, head.to(device=lm_head_weight.device, dtype=dtype))
    head.backprop = backprop
    return head


def _logit_scale(text_config) -> float:
    """The multiplier a model applies to its LM-head output; refuses the rarer scaling schemes rather than ignore
    them."""
    for unsupported in ("logits_scaling", "lm_head_multiplier", "output_multiplier"):
        if getattr(text_config, unsupported, None) not in (None, 1, 1.0):
            raise ValueError(
                f"The soft-Q head does not support models whose config sets `{unsupported}`; its Q-values would "
                "differ from the model's logits."
            )
    scale = getattr(text_config, "logit_scale", None)
    return 1.0 if scale is None else float(scale)


def add_soft_q_head(model: torch.nn.Module, chunk_size: int = 1024) -> None:
    """Patch `model.forward` to accept `soft_q_head=True` (with `labels`) and return a [`SoftQOutput`].

    Without `soft_q_head=True` the previous forward runs unchanged, so generation and TRL's own fused head still work.
    Patch the base model, before or under PEFT: PEFT forwards the keyword to it.
    """
    previous_forward = model.forward
    text_config = model.config.get_text_config()
    softcap = getattr(text_config, "final_logit_softcapping", None)
    logit_scale = _logit_scale(text_config)

    @functools.wraps(type(model).forward)
    def forward(self, *args, soft_q_head=False, labels=None, **kwargs):
        if not soft_q_head:
            if labels is not None:
                kwargs["labels"] = labels
            return previous_forward(*args, **kwargs)

        kwargs["use_cache"] = False
        if getattr(text_config, "output_router_logits", False):  # as the model's own forward reads its config
            kwargs.setdefault("output_router_logits", True)
        # Looked up on each call: PEFT and FSDP replace the modules after patching
        backbone_outputs = self.base_model(*args, **kwargs)
        value_head = getattr(self, SOFT_VALUE_ATTR, None)
        # (B, T + 1): v at every position, the last one included: a cut row bootstraps from the state after its end
        values = value_head(backbone_outputs.last_hidden_state) if value_head is not None else None
        hidden_states = backbone_outputs.last_hidden_state[:, :-1]  # (B, T, H), T = seq_len - 1
        lm_head = self.get_output_embeddings()
        hidden_states = hidden_states.to(lm_head.weight.device)
        labels = labels[:, 1:].to(lm_head.weight.device)  # (B, T)
        mask = labels != -100  # (B, T)
        weight, bias = lm_head.weight, lm_head.bias
        if isinstance(weight, DTensor):  # FSDP2 shards the head; the hidden states are a plain tensor
            weight = weight.full_tensor()
            bias = bias.full_tensor() if bias is not None else None
        with maybe_gather_lm_head_ctx(weight, bias):
            stats = chunked_soft_q_stats(
                hidden_states[mask],  # (N, H): only the scored positions are projected
                weight,
                bias,
                labels[mask],
                logit_scale=logit_scale,
                softcap=softcap,
                chunk_size=chunk_size,
            )

        aux_loss = None
        if kwargs.get("output_router_logits"):
            aux_loss = _router_aux_loss(text_config, backbone_outputs.router_logits, kwargs.get("attention_mask"))

        def scatter(values):  # (N,) -> (B, T), zero off the mask; stays connected to the graph when N == 0
            return values.new_zeros(mask.shape).masked_scatter(mask, values)

        return SoftQOutput(
            target_logits=scatter(stats.target_logits),
            logsumexp=scatter(stats.logsumexp),
            entropy=scatter(stats.entropy),
            is_top1=scatter(stats.is_top1),
            completion_mask=mask,
            segment_ids=_segment_ids(kwargs.get("position_ids"), mask),
            state_values=None if values is None else torch.where(mask, values[:, :-1].to(mask.device), 0.0),
            next_state_values=None if values is None else torch.where(mask, values[:, 1:].to(mask.device), 0.0),
            aux_loss=aux_loss,
        )

    model.forward = types.MethodType(forward, model)


def _segment_ids(position_ids: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor | None:
    """Sequence index (B, T) of each state in rows that join several sequences, or `None` if none does.

    TRL's padding-free and packing collators mark a new sequence by restarting `position_ids`; transformers' sdpa and
    eager attention split the row at exactly the same places (flash attention at TRL's `cu_seq_lens`, the restarts
    again), so the TD term stops where the attention does.
    """
    if position_ids is None:
        return None
    segments = find_packed_sequence_indices(position_ids.expand(mask.shape[0], -1))  # (B, T + 1) or None
    # Position t scores the token after it, from the state that ends at token t
    return None if segments is None else segments[:, :-1].to(mask.device)  # (B, T)


def _router_aux_loss(text_config, router_logits, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The load-balancing loss of a Mixture-of-Experts backbone's router logits, computed as TRL's fused LM head and
    the models' own forwards do (Mixtral's formula, which the other MoE families reuse), over the attended tokens."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    return load_balancing_loss_func(
        router_logits, text_config.num_experts, text_config.num_experts_per_tok, attention_mask
    )
