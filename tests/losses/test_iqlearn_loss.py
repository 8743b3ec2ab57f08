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
