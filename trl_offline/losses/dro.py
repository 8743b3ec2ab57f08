"""Direct Reward Optimisation (DRO) from single-trajectory feedback.

Richemond et al. 2024, "Offline Regularised Reinforcement Learning for Large Language Models Alignment" (arXiv
2405.19107). With a reward `r` per (prompt, response), the KL-regularised optimum satisfies
`r(x, y) = V(x) + tau * log(pi(y|x) / pi_ref(y|x))` for every response, so the policy and a per-prompt value `V(x)`
are fit jointly by least squares on the residual of that identity (their Eq. 4):

    L = 1/2 * E[(r - V(x) - tau * log(pi(y|x) / pi_ref(y|x)))^2]

Each network follows its own gradient of `L` with the other held fixed (their Eq. 7-8): the value is regressed on
`r - tau * log-ratio`, and the policy gets `-rho * grad log pi(y|x)` once the paper's practical `1/tau` rescaling of the
policy gradient is applied (it keeps the policy's step size independent of `tau`). `log pi(y|x)` is the sum of the
completion's token log-probabilities; a token mean would silently change the effective `tau`.
"""

import torch


def dro_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    values: torch.Tensor,
    rewards: torch.Tensor,
    *,
    beta: float = 1.0,
    rescale_policy_grad: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-example DRO loss `1/2 * rho^2`, with `rho = r - V(x) - beta * (log pi(y|x) - log pi_ref(y|x))`.

    Args:
        logps (`torch.Tensor` of shape `(B,)`): `log pi(y|x)`, summed over the completion's tokens.
        ref_logps (`torch.Tensor` of shape `(B,)`): the same under the frozen reference (no gradient).
        values (`torch.Tensor` of shape `(B,)`): `V(x)` from the value network, one per example.
        rewards (`torch.Tensor` of shape `(B,)`): the reward of each (prompt, response) (no gradient).
        beta (`float`): the KL regularisation strength `tau` (> 0; the paper uses 1.0).
        rescale_policy_grad (`bool`): divide the policy's gradient by `beta`, as the paper does in practice.

    Returns:
        `loss` (`torch.Tensor` of shape `(B,)`), whose value is `1/2 * rho^2`; the caller averages it over the batch.
        Its gradient w.r.t. `values` is `-rho`, w.r.t. `logps` `-rho` (or `-beta * rho` without rescaling), and none
        reaches `ref_logps` or `rewards`. `metrics`: detached `(B,)` tensors `residual` (`rho`), `log_ratio`, and
        `policy_loss`, the policy's own objective `-(r - V) * log_ratio + beta / 2 * log_ratio^2` (Eq. 8 divided by
        `beta`): the part of `L / beta` that depends on the policy, 0 at `pi == pi_ref`, whose gradient w.r.t. `logps`
        is `-rho`.
    """
    if beta <= 0:
        raise ValueError(f"`beta` must be > 0, got {beta}.")
    log_ratio = logps - ref_logps.detach()  # (B,)
    rewards = rewards.detach()  # (B,)
    # Value step (Eq. 7): the policy's log-ratio held fixed
    value_residual = rewards - values - beta * log_ratio.detach()  # (B,)
    loss = 0.5 * value_residual.square()  # (B,) the value of L, and the value's gradient -rho
    # Policy step (Eq. 8): V held fixed, grad = -beta * rho * grad log pi, or -rho * grad log pi rescaled by 1/beta.
    # Added as a term whose value is zero, so the loss still reads 1/2 rho^2
    policy_scale = 1.0 if rescale_policy_grad else beta
    policy_term = -policy_scale * value_residual.detach() * logps  # (B,)
    loss = loss + policy_term - policy_term.detach()
    log_ratio = log_ratio.detach()
    # 1/2 rho^2 = 1/2 (r - V)^2 + beta * policy_loss: what the policy can still lower
    policy_loss = -(rewards - values.detach()) * log_ratio + 0.5 * beta * log_ratio.square()  # (B,)
    return loss, {"residual": value_residual.detach(), "log_ratio": log_ratio, "policy_loss": policy_loss}
