import pytest
import torch

from trl_offline.losses import dro_loss


# Two examples, beta = 0.5:
#   row 0: r = 1.0, V = 0.2, log pi = -3.0, log pi_ref = -4.0 -> log-ratio 1.0, rho = 1.0 - 0.2 - 0.5 = 0.3
#   row 1: r = -1.0, V = 0.5, log pi = -2.0, log pi_ref = -1.0 -> log-ratio -1.0, rho = -1.0 - 0.5 + 0.5 = -1.0
BETA = 0.5
RHO = [0.3, -1.0]


def _inputs():
    logps = torch.tensor([-3.0, -2.0], dtype=torch.float64, requires_grad=True)
    ref_logps = torch.tensor([-4.0, -1.0], dtype=torch.float64, requires_grad=True)
    values = torch.tensor([0.2, 0.5], dtype=torch.float64, requires_grad=True)
    rewards = torch.tensor([1.0, -1.0], dtype=torch.float64, requires_grad=True)
    return logps, ref_logps, values, rewards


@pytest.mark.parametrize("rescale_policy_grad", [True, False])
def test_loss_and_gradients_match_hand_computed_values(rescale_policy_grad):
    logps, ref_logps, values, rewards = _inputs()
    loss, metrics = dro_loss(logps, ref_logps, values, rewards, beta=BETA, rescale_policy_grad=rescale_policy_grad)
    # 1/2 rho^2 whatever the rescaling: 0.045 and 0.5
    torch.testing.assert_close(loss, torch.tensor([0.045, 0.5], dtype=torch.float64))
    loss.mean().backward()
    rho = torch.tensor(RHO, dtype=torch.float64)
    torch.testing.assert_close(values.grad, -rho / 2)  # the mean over B = 2
    torch.testing.assert_close(logps.grad, -(1.0 if rescale_policy_grad else BETA) * rho / 2)
    assert ref_logps.grad is None or torch.count_nonzero(ref_logps.grad) == 0
    assert rewards.grad is None or torch.count_nonzero(rewards.grad) == 0
    torch.testing.assert_close(metrics["residual"], rho)
    torch.testing.assert_close(metrics["log_ratio"], torch.tensor([1.0, -1.0], dtype=torch.float64))
    # -(r - V) * log-ratio + beta/2 * log-ratio^2: -(0.8)(1) + 0.25 = -0.55 and -(-1.5)(-1) + 0.25 = -1.25
    torch.testing.assert_close(metrics["policy_loss"], torch.tensor([-0.55, -1.25], dtype=torch.float64))


def test_gradients_match_the_papers_two_partial_objectives():
    # Independent route (Eq. 7-8): the value minimises L with the policy frozen; the policy minimises L with V frozen,
    # its gradient divided by beta when rescaled
    logps, ref_logps, values, rewards = _inputs()
    dro_loss(logps, ref_logps, values, rewards, beta=BETA)[0].sum().backward()

    value_only = torch.tensor([0.2, 0.5], dtype=torch.float64, requires_grad=True)
    (0.5 * (rewards.detach() - value_only - BETA * (logps.detach() - ref_logps.detach())) ** 2).sum().backward()
    policy_only = torch.tensor([-3.0, -2.0], dtype=torch.float64, requires_grad=True)
    objective = 0.5 * (rewards.detach() - values.detach() - BETA * (policy_only - ref_logps.detach())) ** 2
    (objective.sum() / BETA).backward()
    torch.testing.assert_close(values.grad, value_only.grad)
    torch.testing.assert_close(logps.grad, policy_only.grad)


def test_zero_loss_and_gradient_at_the_optimum():
    # pi == pi_ref and V == r: the KL-regularised optimum's identity holds exactly
    logps = torch.tensor([-3.0, -2.0], requires_grad=True)
    values = torch.tensor([0.7, -0.1], requires_grad=True)
    loss, metrics = dro_loss(logps, logps.detach().clone(), values, torch.tensor([0.7, -0.1]), beta=2.0)
    loss.mean().backward()
    assert torch.count_nonzero(loss) == 0
    assert torch.count_nonzero(logps.grad) == 0 and torch.count_nonzero(values.grad) == 0
    assert torch.count_nonzero(metrics["residual"]) == 0


def test_a_larger_reward_pushes_the_log_probability_up_and_the_value_up():
    # Guards against the known sign flip that maximises the squared error
    logps, ref_logps, values, rewards = _inputs()
    loss, _ = dro_loss(logps, ref_logps, values, rewards, beta=BETA)
    loss.mean().backward()
    # Row 0 has rho > 0 (reward above what V and the log-ratio explain): gradient descent raises both
    assert logps.grad[0] < 0 and values.grad[0] < 0
    assert logps.grad[1] > 0 and values.grad[1] > 0


@pytest.mark.parametrize("beta", [0.0, -1.0])
def test_non_positive_beta_is_refused(beta):
    logps, ref_logps, values, rewards = _inputs()
    with pytest.raises(ValueError, match="beta"):
        dro_loss(logps, ref_logps, values, rewards, beta=beta)


def test_policy_loss_is_the_policy_dependent_part_of_the_objective():
    # 1/2 rho^2 = 1/2 (r - V)^2 + beta * policy_loss, and d policy_loss / d logps = -rho
    logps, ref_logps, values, rewards = _inputs()
    loss, metrics = dro_loss(logps, ref_logps, values, rewards, beta=BETA)
    torch.testing.assert_close(loss.detach(), 0.5 * (rewards - values).detach() ** 2 + BETA * metrics["policy_loss"])
    policy = torch.tensor([-3.0, -2.0], dtype=torch.float64, requires_grad=True)
    log_ratio = policy - ref_logps.detach()
    (-(rewards - values).detach() * log_ratio + 0.5 * BETA * log_ratio**2).sum().backward()
    torch.testing.assert_close(policy.grad, -metrics["residual"])
