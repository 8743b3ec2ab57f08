"""Offline inverse soft-Q learning for language models.

Wulfmeier et al. 2024, "Imitating Language via Scalable Inverse Reinforcement Learning" (arXiv 2409.01369). Their
Eq. 14 is an objective `J(v, pi)` over a value `v` and the policy `pi`, whose soft Q-function is
`Q(s, a) = v(s) + log pi(a|s)`; minimised over the demonstrations it is

    E[ lambda * (v(s) + log pi(a|s) - gamma * v(s'))^2 - log pi(a|s) ]

token-level MLE plus a temporal-difference regulariser on the implicit reward `r = Q(s, a) - gamma * v(s')`. Two
choices of `v` are implemented:

- a learned value `v_phi(s)` (`state_values`): only `log pi` comes from the logits, so the loss ignores any per-state
  shift of the logits, whose level on a pretrained model is arbitrary;
- `v(s) = logsumexp(l_s)`, reading the logits themselves as Q-values (`Q(s, a) = l_s[a]`), the original contract.
"""

import torch


def next_action_values(
    values: torch.Tensor, completion_mask: torch.Tensor, *, segment_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """For every position, the value at the next position of the same sequence where the policy acts, or 0 if none.

    The state after an action is the next state where the policy acts again: prompt or user tokens in between are
    part of the environment's transition, so they are skipped. After the last action the episode ends and `V = 0`.
    Gradients flow into `values` (no stop-gradient, as in IQ-Learn's own code).

    Args:
        values (`torch.Tensor` of shape `(B, T)`): `V(s_t)` at every position.
        completion_mask (`torch.Tensor` of shape `(B, T)`): 1 where position t is an action of the policy.
        segment_ids (`torch.Tensor` of shape `(B, T)`, *optional*): Which sequence of its row the state at t belongs
            to, non-decreasing along the row, for packed or padding-free rows that hold several sequences. The next
            action must lie in the same sequence, so each sequence ends (`V = 0`) after its own last action, exactly
            as if it had a row of its own. `None`: every row is one sequence.

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
    if segment_ids is not None:
        # Sequences are contiguous, so a next action in another sequence means none is left in this one
        padded_segments = torch.cat([segment_ids, segment_ids.new_full((B, 1), -1)], dim=1)  # (B, T + 1)
        same_sequence = padded_segments.gather(1, next_positions) == segment_ids  # (B, T)
        next_positions = torch.where(same_sequence, next_positions, T)  # (B, T)
    padded = torch.cat([values, values.new_zeros(B, 1)], dim=1)  # (B, T + 1); slot T holds V = 0
    return padded.gather(1, next_positions)  # (B, T)


def iqlearn_loss(
    target_logits: torch.Tensor,
    logsumexp: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    td_coef: float,
    gamma: float = 1.0,
    segment_ids: torch.Tensor | None = None,
    state_values: torch.Tensor | None = None,
    next_state_values: torch.Tensor | None = None,
    truncated: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token IQLearn loss: negative log-likelihood plus `td_coef` times the squared implicit reward.

    With `state_values`, `Q(s_t, a_t) = v_t + log pi_t` and `V(s) = v(s)`; without, `Q(s_t, a_t) = target_logits` and
    `V(s) = logsumexp` (see the module docstring). `V(s_{t+1})` is `V` at the next action of the same sequence, `0`
    after its last action (the episode ended) unless that action is `truncated`.

    Args:
        target_logits (`torch.Tensor` of shape `(B, T)`): The logit of the token taken at t.
        logsumexp (`torch.Tensor` of shape `(B, T)`): The logsumexp of the logits at t.
        completion_mask (`torch.Tensor` of shape `(B, T)`): 1 where the token at t is an action of the policy.
        td_coef (`float`): `lambda` of Eq. 14; 0 gives plain token-level MLE.
        gamma (`float`): discount of the next state's value.
        segment_ids (`torch.Tensor` of shape `(B, T)`, *optional*): Sequence index of each state within its row, for
            packed or padding-free rows; see [`next_action_values`]. `None`: one sequence per row.
        state_values (`torch.Tensor` of shape `(B, T)`, *optional*): `v(s_t)`, a learned value of the state at t.
        next_state_values (`torch.Tensor` of shape `(B, T)`, *optional*): `v(s_{t+1})`, the learned value of the state
            right after the action at t; read only where `truncated`, and required there with `state_values`.
        truncated (`torch.Tensor` of shape `(B, T)`, *optional*): 1 at the last action of a sequence that was cut
            (by `max_length`) rather than ended: its next state is not terminal. With `state_values` it bootstraps from
            `next_state_values`; without, its TD target is unknown and dropped (its NLL stays).

    Returns:
        `loss` (`torch.Tensor` of shape `(B, T)`), zero where `completion_mask == 0`; the caller reduces it. `metrics`,
        detached per-token tensors of shape `(B, T)`, zero off the mask: `nll` (`-log pi`), `td_loss` (`delta ** 2`,
        without `td_coef`) and `implicit_reward` (`delta`), whose sum over a sequence is the IRL-extracted reward;
        both are 0 at a dropped TD target.
    """
    mask = completion_mask.to(target_logits.dtype)  # (B, T)
    td_mask = mask  # (B, T): where a TD target exists
    log_probs = target_logits - logsumexp  # (B, T)
    if state_values is None:
        values, q_values = logsumexp, target_logits  # (B, T), (B, T): the logits are the Q-values
    else:
        values, q_values = state_values, state_values + log_probs  # (B, T), (B, T): Q(s, a) = v(s) + log pi(a|s)
    next_values = next_action_values(values, completion_mask, segment_ids=segment_ids)  # (B, T)
    if truncated is not None:
        truncated = truncated.bool() & completion_mask.bool()  # (B, T)
        if state_values is None:  # nothing to bootstrap from: that target is dropped
            td_mask = mask * ~truncated  # (B, T)
        else:
            if next_state_values is None:
                raise ValueError("`truncated` with `state_values` needs `next_state_values` to bootstrap from.")
            next_values = torch.where(truncated, next_state_values, next_values)  # (B, T)
    # Eq. 14: r_t = v(s_t) + log pi(a_t|s_t) - gamma * v(s_{t+1}) = Q(s_t, a_t) - gamma * V(s_{t+1})
    implicit_reward = q_values - gamma * next_values  # (B, T)
    nll = -log_probs * mask  # (B, T)
    td_loss = implicit_reward.square() * td_mask  # (B, T)
    loss = nll + td_coef * td_loss  # (B, T)
    metrics = {
        "nll": nll.detach(),
        "td_loss": td_loss.detach(),
        "implicit_reward": (implicit_reward * td_mask).detach(),
    }
    return loss, metrics
