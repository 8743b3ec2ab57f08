"""A soft-Q head for a causal LM: `model(..., labels=labels, soft_q_head=True)` returns, at every scored position,
`Q(s_t, a_t)` (the taken token's logit) and `V(s_t)` (the logsumexp of the logits), never building the
`(batch, seq_len, vocab)` logits.

The statistics are computed inside the model's own forward, not in the trainer, because DDP and DeepSpeed ZeRO-3
arm their gradient hooks around `forward`: the LM-head weight must be read there for its gradient to be reduced.
Mixture-of-Experts models also return their load-balancing loss (`aux_loss`), as TRL's fused LM head does.
"""

import functools
import types
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor
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
        aux_loss: The Mixture-of-Experts load-balancing loss, a scalar, when the router logits were asked for
            (`output_router_logits`); `None` otherwise.
    """

    target_logits: torch.Tensor | None = None
    logsumexp: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    completion_mask: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


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
            aux_loss=aux_loss,
        )

    model.forward = types.MethodType(forward, model)


def _router_aux_loss(text_config, router_logits, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The load-balancing loss of a Mixture-of-Experts backbone's router logits, computed as TRL's fused LM head and
    the models' own forwards do (Mixtral's formula, which the other MoE families reuse), over the attended tokens."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    return load_balancing_loss_func(
        router_logits, text_config.num_experts, text_config.num_experts_per_tok, attention_mask
    )
