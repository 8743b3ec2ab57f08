"""Per-position soft-Q statistics of a causal LM, computed tile by tile from the final hidden states.

Inverse soft-Q learning (IQLearn) reads the LM logits as Q-values: `Q(s, a) = logits[a]` and
`V(s) = logsumexp(logits)`, and its loss needs gradients through both. The obvious route, `lm_head(hidden)`, builds
the `(B x T, V)` logits plus their float32 copy and softmax for the backward, which dominates activation memory at
large vocabularies. TRL's fused/chunked heads avoid that but return only log-probs (`Q - V`), which loses the two
terms IQLearn weighs separately.

[`chunked_soft_q_stats`] projects `chunk_size` rows at a time, keeps only four numbers per row, and recomputes each
tile in the backward, so peak memory holds a few `(chunk_size, V)` tiles instead of the full logits. The weight and
bias are kept as the original parameters (not saved tensors) so the backward can re-gather them under ZeRO-3.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .._trl_compat import maybe_gather_lm_head_ctx


class SoftQStats(NamedTuple):
    """Per-row outputs, float32 (float64 for float64 inputs).

    Args:
        target_logits: `Q(s, a)`, the logit of the label token (differentiable).
        logsumexp: `V(s)`, the logsumexp of the logits (differentiable).
        entropy: Entropy of the softmax of the logits (detached), or `None` if `with_stats=False`.
        is_top1: Whether the label is the argmax of the logits, or `None` if `with_stats=False`.
    """

    target_logits: torch.Tensor
    logsumexp: torch.Tensor
    entropy: torch.Tensor | None
    is_top1: torch.Tensor | None


def _tile_logits(h, weight, bias, cfg):
    """Logits of one tile in the compute dtype; also returns `tanh(.)` of the softcap (or `None`) for the backward.
    `weight` and `bias` are already in the matmul dtype."""
    matmul_dtype, compute_dtype, logit_scale, softcap = cfg
    logits = F.linear(h.to(matmul_dtype), weight, bias).to(compute_dtype)  # (C, V)
    if logit_scale != 1.0:
        logits.mul_(logit_scale)
    if softcap is None:
        return logits, None
    tanh = logits.div_(softcap).tanh_()  # (C, V), in place: the pre-cap logits are not needed
    return tanh * softcap, tanh  # (C, V), (C, V)


def _cast(weight, bias, dtype):
    """No copy unless autocast asks for a matmul dtype other than the parameters'."""
    return weight.to(dtype), None if bias is None else bias.to(dtype)


class _ChunkedSoftQFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_states, weight, bias, labels, cfg, chunk_size, with_stats):
        n, compute_dtype = hidden_states.shape[0], cfg[1]
        target = hidden_states.new_empty(n, dtype=compute_dtype)  # (N,)
        lse = torch.empty_like(target)  # (N,)
        entropy = torch.empty_like(target) if with_stats else None  # (N,)
        is_top1 = torch.empty_like(labels, dtype=torch.bool) if with_stats else None  # (N,)
        with torch.autocast(hidden_states.device.type, enabled=False):
            w, b = _cast(weight, bias, cfg[0])  # (V, H), (V,)
            for start in range(0, n, chunk_size):
                rows = slice(start, start + chunk_size)
                logits, _ = _tile_logits(hidden_states[rows], w, b, cfg)  # (C, V)
                target[rows] = logits.gather(1, labels[rows, None]).squeeze(1)  # (C,)
                lse[rows] = torch.logsumexp(logits, dim=-1)  # (C,)
                if with_stats:
                    is_top1[rows] = logits.argmax(dim=-1) == labels[rows]  # (C,)
                    # H = lse - sum_a p(a) * logit(a), with p = exp(logits - lse)
                    probs = (logits - lse[rows, None]).exp_()  # (C, V)
                    entropy[rows] = lse[rows] - probs.mul_(logits).sum(dim=-1)  # (C,)
        ctx.save_for_backward(hidden_states, labels, lse)
        # Parameters, not saved tensors: under ZeRO-3 their storage is swapped when they are re-gathered
        ctx.weight, ctx.bias, ctx.cfg, ctx.chunk_size = weight, bias, cfg, chunk_size
        if with_stats:
            ctx.mark_non_differentiable(entropy, is_top1)
        return target, lse, entropy, is_top1

    @staticmethod
    def backward(ctx, grad_target, grad_lse, *_):
        hidden_states, labels, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = grad_weight = grad_bias = None
        n, (matmul_dtype, compute_dtype, logit_scale, _) = hidden_states.shape[0], ctx.cfg
        with maybe_gather_lm_head_ctx(ctx.weight, ctx.bias), torch.autocast(hidden_states.device.type, enabled=False):
            weight, bias = ctx.weight, ctx.bias
            if need_hidden:
                grad_hidden = torch.empty_like(hidden_states)  # (N, H)
            if need_weight:
                grad_weight = torch.zeros(weight.shape, dtype=compute_dtype, device=weight.device)  # (V, H)
            if need_bias:
                grad_bias = torch.zeros(bias.shape, dtype=compute_dtype, device=bias.device)  # (V,)
            w, b = _cast(weight, bias, matmul_dtype)  # (V, H), (V,)
            for start in range(0, n, ctx.chunk_size):
                rows = slice(start, start + ctx.chunk_size)
                h = hidden_states[rows].to(matmul_dtype)  # (C, H)
                logits, tanh = _tile_logits(h, w, b, ctx.cfg)  # (C, V)
                # d loss / d logits = g_lse * softmax + g_target * onehot(label)
                grad = logits.sub_(lse[rows, None]).exp_().mul_(grad_lse[rows, None])  # (C, V)
                grad.scatter_add_(1, labels[rows, None], grad_target[rows, None])
                if tanh is not None:  # d(c * tanh(x / c)) / dx = 1 - tanh^2
                    grad.mul_(tanh.square_().neg_().add_(1.0))
                if logit_scale != 1.0:
                    grad.mul_(logit_scale)
                grad_mm = grad.to(matmul_dtype)  # (C, V)
                if need_hidden:
                    grad_hidden[rows] = grad_mm @ w  # (C, H)
                if need_weight:
                    if grad_weight.dtype == matmul_dtype:
                        grad_weight.addmm_(grad_mm.T, h)  # (V, H)
                    else:  # matmul in the input dtype, summed in float32
                        grad_weight += grad_mm.T @ h  # (V, H)
                if need_bias:
                    grad_bias += grad.sum(dim=0)  # (V,)
            if need_weight:
                grad_weight = grad_weight.to(weight.dtype)
            if need_bias:
                grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def chunked_soft_q_stats(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    chunk_size: int = 1024,
    with_stats: bool = True,
) -> SoftQStats:
    """Target logit and logsumexp of `logits = softcap(logit_scale * (hidden_states @ weight.T + bias))` per row.

    Args:
        hidden_states: `(N, H)` final hidden states of the scored positions, any float dtype.
        weight: `(V, H)` LM-head weight (may be the tied input embedding).
        bias: `(V,)` LM-head bias, or `None`.
        labels: `(N,)` long, each a valid vocabulary index.
        logit_scale: Multiplier applied before softcapping.
        softcap: If set, `logits = softcap * tanh(logits / softcap)` (Gemma-style).
        chunk_size: Rows per tile; peak extra memory is a few `(chunk_size, V)` float32 tiles.
        with_stats: Also return the entropy and whether the label is the top-1 token (no gradient).

    The tile matmul runs in the input dtype (the autocast dtype when autocast is on), the tile logits are then upcast
    to float32 (float64 for float64 inputs). Under DeepSpeed ZeRO-3, call it inside `maybe_gather_lm_head_ctx`.
    """
    if hidden_states.dim() != 2 or labels.shape != hidden_states.shape[:1]:
        raise ValueError(
            f"Expected (N, H) hidden states and (N,) labels, got {hidden_states.shape} and {labels.shape}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    device_type = hidden_states.device.type
    if torch.is_autocast_enabled(device_type):
        matmul_dtype = torch.get_autocast_dtype(device_type)
    else:
        matmul_dtype = hidden_states.dtype
    compute_dtype = torch.promote_types(matmul_dtype, torch.float32)
    cfg = (matmul_dtype, compute_dtype, float(logit_scale), None if softcap is None else float(softcap))
    outputs = _ChunkedSoftQFunction.apply(hidden_states, weight, bias, labels, cfg, chunk_size, with_stats)
    return SoftQStats(*outputs)
