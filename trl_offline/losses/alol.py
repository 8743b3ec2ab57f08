"""Advantage-Leftover-Lunch (A-LoL) offline policy gradient.

Baheti et al. 2024, "Leftover Lunch: Advantage-based Offline Reinforcement Learning for Language Models" (ICLR 2024,
arXiv 2305.14718). The whole response is one action. With a sequence reward `R(x, y)` and the reference policy's
value `V_ref(x)`, the advantage `A = R - V_ref(x)` is fixed before training, and the gradient (their Eq. 3)

    -E[ A * (pi(y|x) / pi_ref(y|x)) * grad log pi(y|x) ]

is taken over rows with `A > 0` only ("leftover lunch": the rows worth learning from). The importance weight is a
constant of the gradient (computed without gradient) clipped to `[1 - eps, 1 + eps]`, and `log pi(y|x)` is the sum
of token log-probabilities (the authors found the sum better than the mean).
"""

import torch


VARIANTS = ("alol", "alol_seq", "alol_ref_free", "alol_kl")


def alol_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    completion_mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    variant: str = "alol",
    clip_epsilon: float = 0.9,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-sequence A-LoL loss of one of the four variants.

    Args:
        logps (`torch.Tensor` of shape `(B, T)`): Per-token log-probabilities of the completion under the policy.
        ref_logps (`torch.Tensor` of shape `(B, T)` or `(B,)`, *optional*): The same under the frozen reference;
            unused (and may be `None`) for `"alol_ref_free"`. Every variant but `"alol_seq"` uses only its sum over the
            completion, so the sequence log-probability `(B,)` may be passed instead.
        completion_mask (`torch.Tensor` of shape `(B, T)`): 1 on completion tokens.
        advantages (`torch.Tensor` of shape `(B,)`): `A = R(x, y) - V_ref(x)`, fixed before training.
        variant (`str`): `"alol"` (sequence importance weight), `"alol_seq"` (per-token weights), `"alol_ref_free"`
            (no weight) or `"alol_kl"` (no weight, a KL penalty towards the reference instead).
        clip_epsilon (`float`): Importance weights are clamped to `[1 - clip_epsilon, 1 + clip_epsilon]`.
        kl_coef (`float`): Weight of the KL penalty of `"alol_kl"`.

    Returns:
        `loss` (`torch.Tensor` of shape `(B,)`), to be averaged over sequences by the caller; zero, with zero gradient,
        for rows with `A <= 0`, which A-LoL does not train on. `metrics`: detached `(B,)` tensors `nll` (summed over
        tokens), `importance_weight` and `clipped` (fraction of clamped weights; token means for `"alol_seq"`; absent
        for the weight-free variants) and `kl` (the summed log-ratio `log pi(y|x) - log pi_ref(y|x)`, when the
        reference is given).
    """
    if variant not in VARIANTS:
        raise ValueError(f"`variant` must be one of {VARIANTS}, got {variant!r}.")
    if ref_logps is None and variant != "alol_ref_free":
        raise ValueError(f"Variant {variant!r} needs the reference log-probabilities.")
    mask = completion_mask.to(logps.dtype)  # (B, T)
    positive = advantages.clamp(min=0)  # (B,) A+
    token_nll = -logps * mask  # (B, T)
    nll = token_nll.sum(-1)  # (B,) a sum over tokens, not a mean
    metrics = {"nll": nll.detach()}
    low, high = 1 - clip_epsilon, 1 + clip_epsilon

    if ref_logps is not None and ref_logps.dim() == 1:
        if variant == "alol_seq":
            raise ValueError("Variant 'alol_seq' needs per-token reference log-probabilities (B, T), got (B,).")
        sequence_log_ratio = (logps * mask).sum(-1) - ref_logps  # (B,) log pi(y|x) - log pi_ref(y|x)
    elif ref_logps is not None:
        log_ratio = (logps - ref_logps) * mask  # (B, T)
        sequence_log_ratio = log_ratio.sum(-1)  # (B,)
    if ref_logps is not None:
        metrics["kl"] = sequence_log_ratio.detach()  # (B,)

    if variant == "alol":
        # A+ * clamp(pi(y|x) / pi_ref(y|x)) * NLL, the weight held constant (Eq. 3)
        ratio = sequence_log_ratio.detach().exp()  # (B,)
        weight = ratio.clamp(low, high)  # (B,)
        loss = positive * weight * nll  # (B,)
        metrics["importance_weight"] = weight
        metrics["clipped"] = (weight != ratio).to(logps.dtype)
    elif variant == "alol_seq":
        # Per-token weights pi(y_t|.) / pi_ref(y_t|.): A-LoL seq, a lower-variance variant of the same gradient
        ratio = log_ratio.detach().exp()  # (B, T)
        weight = ratio.clamp(low, high)  # (B, T)
        loss = positive * (weight * token_nll).sum(-1)  # (B,)
        num_tokens = mask.sum(-1).clamp(min=1)  # (B,)
        metrics["importance_weight"] = (weight * mask).sum(-1) / num_tokens
        metrics["clipped"] = ((weight != ratio).to(logps.dtype) * mask).sum(-1) / num_tokens
    elif variant == "alol_ref_free":
        loss = positive * nll  # (B,)
    else:  # "alol_kl": A+ * NLL + kl_coef * (log pi(y|x) - log pi_ref(y|x)), on the rows A-LoL trains on
        loss = positive * nll + kl_coef * sequence_log_ratio * (advantages > 0).to(logps.dtype)  # (B,)
    return loss, metrics
