"""Offline inverse soft-Q learning for language models.

Wulfmeier et al. 2024, "Imitating Language via Scalable Inverse Reinforcement Learning" (arXiv 2409.01369). The
policy's logits are soft Q-values: `Q(s_t, a) = l_t[a]` and `V(s_t) = logsumexp(l_t)`, so `log pi(a_t | s_t) =
Q(s_t, a_t) - V(s_t)`. Their Eq. 14, minimised over the demonstrations, is

    E[ lambda * (V(s) + log pi(a|s) - gamma * V(s'))^2 - log pi(a|s) ]

and since `V(s) + log pi(a|s) = Q(s, a)` the squared term is the implicit reward `Q(s, a) - gamma * V(s')` squared:
token-level MLE plus a temporal-difference regulariser on the reward the model implies.
"""

import torch


def next_action_values(values: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """For every position, the value at the next position of the same row where the policy acts, or 0 if none.

    The state after an action is the next state where the policy acts again: prompt or user tokens in between are
    part of the environment's transition, so they are skipped. After the last action the episode ends and `V = 0`.
    Gradients flow into `values` (no stop-gradient, as in IQ-Learn's own code).

    Args:
        values (`torch.Tensor` of shape `(B, T)`): `V(s_t)` at every position.
        completion_mask (`torch.Tensor` of shape `(B, T)`): 1 where position t is an action of the policy.

    Returns:
        `torch.Tensor` of shape `(B, T)`.
    """
    B, T = values.shape
    positions = torch.arange(T, device=values.device).expand(B, T)  # (B, T)
    # Index of each action position, T (the "episode over" slot) elsewhere
    action_positions = torch.where(completion_mask.bool(), positions, T)  # (B, T)
    # The next action strictly after t is the running minimum, taken from the right, of the positions after t
    after = torch.cat([action_positions[:, 1:], action_positions.new_full((B, 1), T)], dim=1)  # (B, T)
    next_positions = after.flip(1).cummin(dim=1).values.flip(1)  # (B, T), in [1, T]
    padded = torch.cat([values, values.new_zeros(B, 1)], dim=1)  # (B, T + 1); slot T holds V = 0
    return padded.gather(1, next_positions)  # (B, T)


def iqlearn_loss(
    target_logits: torch.Tensor,
    logsumexp: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    td_coef: float,
    gamma: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token IQLearn loss: negative log-likelihood plus `td_coef` times the squared implicit reward.

    Args:
        target_logits (`torch.Tensor` of shape `(B, T)`): `Q(s_t, a_t)`, the logit of the token taken at t.
        logsumexp (`torch.Tensor` of shape `(B, T)`): `V(s_t)`, the logsumexp of the logits at t.
        completion_mask (`torch.Tensor` of shape `(B, T)`): 1 where the token at t is an action of the policy.
        td_coef (`float`): `lambda` of Eq. 14; 0 gives plain token-level MLE.
        gamma (`float`): discount of the next state's value.

    Returns:
        `loss` (`torch.Tensor` of shape `(B, T)`), zero where `completion_mask == 0`; the caller reduces it. `metrics`,
        detached per-token tensors of shape `(B, T)`, zero off the mask: `nll` (`-log pi`), `td_loss` (`delta ** 2`,
        without `td_coef`) and `implicit_reward` (`delta`), whose sum over a sequence is the IRL-extracted reward.
    """
    mask = completion_mask.to(target_logits.dtype)  # (B, T)
    log_probs = target_logits - logsumexp  # (B, T)
    next_values = next_action_values(logsumexp, completion_mask)  # (B, T)
    # Implicit reward r_t = Q(s_t, a_t) - gamma * V(s_{t+1}) (Eq. 14, with V(s) + log pi(a|s) = Q(s, a))
    implicit_reward = target_logits - gamma * next_values  # (B, T)
    nll = -log_probs * mask  # (B, T)
    td_loss = implicit_reward.square() * mask  # (B, T)
    loss = nll + td_coef * td_loss  # (B, T)
    metrics = {
        "nll": nll.detach(),
        "td_loss": td_loss.detach(),
        "implicit_reward": (implicit_reward * mask).detach(),
    }
    return loss, metrics
