import pytest
import torch

from trl_offline.losses import iqlearn_loss, next_action_values


# One row: a prompt token at t=0, then three actions. gamma=0.9, td_coef=0.5.
#   log pi      = target - lse           = [., -0.5, -0.5, -0.2]
#   V_next      = lse at the next action = [., 1.5, 3.2, 0]  (0 after the last action: the episode ends)
#   delta       = target - 0.9 * V_next  = [., 0.65, -1.88, 3.0]
#   loss        = -log pi + 0.5 delta^2  = [0, 0.71125, 2.2672, 4.7]
TARGET = [[0.5, 2.0, 1.0, 3.0]]
LSE = [[1.0, 2.5, 1.5, 3.2]]
MASK = [[0, 1, 1, 1]]


def _inputs():
    target = torch.tensor(TARGET, requires_grad=True)
    lse = torch.tensor(LSE, requires_grad=True)
    return target, lse, torch.tensor(MASK)


def test_loss_matches_hand_computed_values():
    target, lse, mask = _inputs()
    loss, metrics = iqlearn_loss(target, lse, mask, td_coef=0.5, gamma=0.9)
    torch.testing.assert_close(loss, torch.tensor([[0.0, 0.71125, 2.2672, 4.7]]))
    torch.testing.assert_close(metrics["nll"], torch.tensor([[0.0, 0.5, 0.5, 0.2]]))
    torch.testing.assert_close(metrics["td_loss"], torch.tensor([[0.0, 0.4225, 3.5344, 9.0]]))
    torch.testing.assert_close(metrics["implicit_reward"], torch.tensor([[0.0, 0.65, -1.88, 3.0]]))


def test_gradient_flows_through_the_next_value():
    # d loss / d lse[t] = 1 (from -log pi_t) + td_coef * 2 * delta_{t-1} * (-gamma) (lse[t] is V_next of t-1):
    #   lse[1]: 1 (t=0 is a prompt token, so its TD term is masked)
    #   lse[2]: 1 + 0.5 * 2 * 0.65 * -0.9  = 0.415
    #   lse[3]: 1 + 0.5 * 2 * -1.88 * -0.9 = 2.692
    # d loss / d target[t] = -1 + td_coef * 2 * delta_t = [0, -0.35, -2.88, 2.0]
    target, lse, mask = _inputs()
    loss, _ = iqlearn_loss(target, lse, mask, td_coef=0.5, gamma=0.9)
    loss.sum().backward()
    torch.testing.assert_close(lse.grad, torch.tensor([[0.0, 1.0, 0.415, 2.692]]))
    torch.testing.assert_close(target.grad, torch.tensor([[0.0, -0.35, -2.88, 2.0]]))


def test_next_value_skips_non_action_tokens_in_multi_turn_rows():
    # Two assistant turns separated by user tokens at t=3,4: the action at t=2 bootstraps from V at t=5, and the
    # second row, which is all prompt, has nothing to bootstrap from.
    values = torch.tensor([[10.0, 11.0, 12.0, 13.0, 14.0, 15.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    mask = torch.tensor([[0, 1, 1, 0, 0, 1], [0, 0, 0, 0, 0, 0]])
    expected = torch.tensor([[11.0, 12.0, 15.0, 15.0, 15.0, 0.0], [0.0] * 6])
    torch.testing.assert_close(next_action_values(values, mask), expected)


def test_multi_turn_loss_value():
    # The action at t=2 (end of the first turn) is followed by user tokens: delta = 1.0 - 1.0 * lse[5] = 1.0 - 4.0
    target = torch.tensor([[0.0, 2.0, 1.0, 0.0, 0.0, 3.0]])
    lse = torch.tensor([[0.0, 2.5, 1.5, 9.0, 9.0, 4.0]])
    mask = torch.tensor([[0, 1, 1, 0, 0, 1]])
    loss, metrics = iqlearn_loss(target, lse, mask, td_coef=1.0, gamma=1.0)
    # delta = [., 2.0 - 1.5, 1.0 - 4.0, ., ., 3.0 - 0]; nll = [., 0.5, 0.5, ., ., 1.0]
    torch.testing.assert_close(metrics["implicit_reward"], torch.tensor([[0.0, 0.5, -3.0, 0.0, 0.0, 3.0]]))
    torch.testing.assert_close(loss, torch.tensor([[0.0, 0.75, 9.5, 0.0, 0.0, 10.0]]))


def test_zero_td_coef_is_token_mle():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    labels = torch.randint(0, 11, (3, 7))
    mask = torch.rand(3, 7) > 0.3
    target = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    loss, _ = iqlearn_loss(target, logits.logsumexp(-1), mask, td_coef=0.0)
    expected = torch.nn.functional.cross_entropy(logits[mask], labels[mask])
    torch.testing.assert_close(loss.sum() / mask.sum(), expected)


@pytest.mark.parametrize("td_coef,gamma", [(0.1, 1.0), (1.0, 0.95)])
def test_matches_an_independent_loop_implementation(td_coef, gamma):
    torch.manual_seed(1)
    target = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    lse = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(4, 9) > 0.4
    loss, _ = iqlearn_loss(target, lse, mask, td_coef=td_coef, gamma=gamma)

    expected = torch.zeros(4, 9, dtype=torch.float64)
    for b in range(4):
        for t in range(9):
            if not mask[b, t]:
                continue
            later = [u for u in range(t + 1, 9) if mask[b, u]]
            v_next = lse[b, later[0]] if later else 0.0
            delta = target[b, t] - gamma * v_next
            expected[b, t] = -(target[b, t] - lse[b, t]) + td_coef * delta**2
    torch.testing.assert_close(loss, expected)

    grads = torch.autograd.grad(loss.sum(), (target, lse))
    expected_grads = torch.autograd.grad(expected.sum(), (target, lse))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


def test_masked_positions_get_no_gradient():
    target, lse, _ = _inputs()
    mask = torch.tensor([[0, 0, 0, 0]])
    loss, _ = iqlearn_loss(target, lse, mask, td_coef=0.5)
    loss.sum().backward()
    assert torch.count_nonzero(target.grad) == 0 and torch.count_nonzero(lse.grad) == 0


# -- Packed rows: several sequences in one row, told apart by `segment_ids` ----------------------------------------------


def test_next_value_stops_at_sequence_boundaries():
    # Row 0 packs two sequences (t=0-2, t=3-5), each a prompt token then two actions: the last action of each
    # sequence (t=2, t=5) ends its episode, although an action of the next sequence follows t=2.
    # Row 1: the first sequence (t=0-3) has a non-action at t=2, skipped inside the sequence (t=1 -> t=3); its last
    # action t=3 is followed at once by an action of the second sequence (t=4), which it must not bootstrap from.
    values = torch.tensor([[10.0, 11.0, 12.0, 13.0, 14.0, 15.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    mask = torch.tensor([[0, 1, 1, 0, 1, 1], [0, 1, 0, 1, 1, 1]])
    segments = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1]])
    expected = torch.tensor([[11.0, 12.0, 0.0, 14.0, 15.0, 0.0], [2.0, 4.0, 4.0, 0.0, 6.0, 0.0]])
    torch.testing.assert_close(next_action_values(values, mask, segment_ids=segments), expected)
    # Without the segments the row is one episode: t=2 and t=3 would bootstrap across the boundary
    across = next_action_values(values, mask)
    assert across[0, 2] == 14.0 and across[1, 3] == 5.0


def test_packed_row_gives_the_loss_and_gradients_of_separate_rows():
    # The hand-computed row above, packed twice into one row, is two episodes: the loss of each half is the
    # hand-computed one, in particular 4.7 at t=3, whose next value is 0 and not V at t=5 (the second copy's action)
    target = torch.tensor([TARGET[0] * 2], requires_grad=True)
    lse = torch.tensor([LSE[0] * 2], requires_grad=True)
    mask = torch.tensor([MASK[0] * 2])
    segments = torch.tensor([[0] * 4 + [1] * 4])
    loss, metrics = iqlearn_loss(target, lse, mask, td_coef=0.5, gamma=0.9, segment_ids=segments)
    torch.testing.assert_close(loss, torch.tensor([[0.0, 0.71125, 2.2672, 4.7] * 2]))
    torch.testing.assert_close(metrics["implicit_reward"], torch.tensor([[0.0, 0.65, -1.88, 3.0] * 2]))
    loss.sum().backward()
    # The gradients of `test_gradient_flows_through_the_next_value`, once per sequence
    torch.testing.assert_close(lse.grad, torch.tensor([[0.0, 1.0, 0.415, 2.692] * 2]))
    torch.testing.assert_close(target.grad, torch.tensor([[0.0, -0.35, -2.88, 2.0] * 2]))


# -- The learned value (`state_values`): Q(s, a) = v(s) + log pi(a|s) ---------------------------------------------------

# The row above with a learned value v; `NEXT_V` is v of the state right after each action (at t=3, after the last
# token). gamma=0.9, td_coef=0.5.
#   log pi      = target - lse                 = [., -0.5, -0.5, -0.2]
#   Q           = v + log pi                   = [., 0.5, -2.5, 0.3]
#   V_next      = v at the next action, else 0 = [., -2.0, 0.5, 0]
#   delta       = Q - 0.9 * V_next             = [., 2.3, -2.95, 0.3]
#   loss        = -log pi + 0.5 delta^2        = [0, 3.145, 4.85125, 0.245]
V = [[0.3, 1.0, -2.0, 0.5]]
NEXT_V = [[1.0, -2.0, 0.5, 4.0]]


def _value_inputs():
    target, lse, mask = _inputs()
    return target, lse, mask, torch.tensor(V, requires_grad=True), torch.tensor(NEXT_V, requires_grad=True)


def test_learned_value_loss_matches_hand_computed_values():
    target, lse, mask, values, next_values = _value_inputs()
    loss, metrics = iqlearn_loss(
        target, lse, mask, td_coef=0.5, gamma=0.9, state_values=values, next_state_values=next_values
    )
    torch.testing.assert_close(loss, torch.tensor([[0.0, 3.145, 4.85125, 0.245]]))
    torch.testing.assert_close(metrics["nll"], torch.tensor([[0.0, 0.5, 0.5, 0.2]]))
    torch.testing.assert_close(metrics["td_loss"], torch.tensor([[0.0, 5.29, 8.7025, 0.09]]))
    torch.testing.assert_close(metrics["implicit_reward"], torch.tensor([[0.0, 2.3, -2.95, 0.3]]))
    # d loss / d v_t = td_coef * 2 * (delta_t - gamma * delta_{t-1}) over actions: v_t is in Q_t and in V_next of t-1
    #   v1: 2.3;  v2: -2.95 - 0.9 * 2.3 = -5.02;  v3: 0.3 + 0.9 * 2.95 = 2.955
    # d loss / d target_t = -1 + delta_t (log pi is in both terms); d / d lse_t is its opposite
    loss.sum().backward()
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 2.3, -5.02, 2.955]]))
    torch.testing.assert_close(target.grad, torch.tensor([[0.0, 1.3, -3.95, -0.7]]))
    torch.testing.assert_close(lse.grad, -target.grad)
    assert next_values.grad is None  # the episode ended: nothing bootstraps from the state after it


def _logits_case(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 6, 11, dtype=torch.float64, generator=generator) * 3
    labels = torch.randint(0, 11, (2, 6), generator=generator)
    mask = torch.tensor([[0, 1, 1, 1, 0, 1], [0, 0, 1, 1, 1, 1]])
    values = torch.randn(2, 6, dtype=torch.float64, generator=generator)
    shift = torch.randn(2, 6, 1, dtype=torch.float64, generator=generator) * 10  # a per-position constant
    return logits, labels, mask, values, shift


def _loss_and_grads(logits, labels, mask, values, value_kwargs):
    logits = logits.clone().requires_grad_(True)
    values = values.clone().requires_grad_(True)
    target = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    loss, _ = iqlearn_loss(target, logits.logsumexp(-1), mask, td_coef=0.7, gamma=0.9, **value_kwargs(values))
    return (loss, *torch.autograd.grad(loss.sum(), (logits, values), allow_unused=True))


def test_learned_value_ignores_a_per_position_shift_of_the_logits():
    # The point of the learned value: a pretrained model's logits have arbitrary levels, and only log pi is read
    logits, labels, mask, values, shift = _logits_case()
    truncated = torch.tensor([[0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]])
    head = lambda v: {"state_values": v, "next_state_values": v.roll(-1, 1) * 0.5, "truncated": truncated}  # noqa: E731
    loss, logits_grad, values_grad = _loss_and_grads(logits, labels, mask, values, head)
    shifted_loss, shifted_logits_grad, shifted_values_grad = _loss_and_grads(
        logits + shift, labels, mask, values, head
    )
    torch.testing.assert_close(shifted_loss, loss)
    torch.testing.assert_close(shifted_logits_grad, logits_grad)
    torch.testing.assert_close(shifted_values_grad, values_grad)


def test_logsumexp_value_depends_on_the_logits_level():
    # The original contract reads the logits as Q-values: the same shift moves its loss and its gradients
    logits, labels, mask, values, shift = _logits_case()
    loss, logits_grad, _ = _loss_and_grads(logits, labels, mask, values, lambda v: {})
    shifted_loss, shifted_logits_grad, _ = _loss_and_grads(logits + shift, labels, mask, values, lambda v: {})
    assert not torch.allclose(shifted_loss, loss) and not torch.allclose(shifted_logits_grad, logits_grad)


# -- Truncation: a last action cut by max_length is not the end of the episode -----------------------------------------


def test_truncated_last_action_bootstraps_from_the_learned_value():
    # The same row, cut after its last action instead of ending there: V_next at t=3 is v after it (4.0), not 0
    #   delta_3 = 0.3 - 0.9 * 4.0 = -3.3;  loss_3 = 0.2 + 0.5 * 10.89 = 5.645; the other positions are unchanged
    target, lse, mask, values, next_values = _value_inputs()
    truncated = torch.tensor([[0, 0, 0, 1]])
    loss, metrics = iqlearn_loss(
        target,
        lse,
        mask,
        td_coef=0.5,
        gamma=0.9,
        state_values=values,
        next_state_values=next_values,
        truncated=truncated,
    )
    torch.testing.assert_close(loss, torch.tensor([[0.0, 3.145, 4.85125, 5.645]]))
    torch.testing.assert_close(metrics["implicit_reward"], torch.tensor([[0.0, 2.3, -2.95, -3.3]]))
    loss.sum().backward()
    # d / d v_after_3 = td_coef * 2 * delta_3 * -gamma = 2.97; v3 itself: -3.3 + 0.9 * 2.95 = -0.645
    torch.testing.assert_close(next_values.grad, torch.tensor([[0.0, 0.0, 0.0, 2.97]]))
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 2.3, -5.02, -0.645]]))


def test_truncated_last_action_drops_its_target_with_the_logsumexp_value():
    # Nothing to bootstrap from: the cut action keeps its NLL (0.2) and loses its TD term and implicit reward
    target, lse, mask = _inputs()
    loss, metrics = iqlearn_loss(target, lse, mask, td_coef=0.5, gamma=0.9, truncated=torch.tensor([[0, 0, 0, 1]]))
    torch.testing.assert_close(loss, torch.tensor([[0.0, 0.71125, 2.2672, 0.2]]))
    torch.testing.assert_close(metrics["td_loss"], torch.tensor([[0.0, 0.4225, 3.5344, 0.0]]))
    torch.testing.assert_close(metrics["implicit_reward"], torch.tensor([[0.0, 0.65, -1.88, 0.0]]))
    torch.testing.assert_close(metrics["nll"], torch.tensor([[0.0, 0.5, 0.5, 0.2]]))


def test_truncation_with_a_learned_value_needs_the_value_after_the_cut():
    target, lse, mask, values, _ = _value_inputs()
    with pytest.raises(ValueError, match="`truncated` with `state_values` needs `next_state_values`"):
        iqlearn_loss(target, lse, mask, td_coef=0.5, state_values=values, truncated=torch.tensor([[0, 0, 0, 1]]))
