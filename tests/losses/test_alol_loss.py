import math

import pytest
import torch

from trl_offline.losses import alol_loss


# Row 0: two completion tokens (t=2 is padding), A = 2.0. Row 1: A = -0.5, must contribute nothing.
#   row 0: NLL = 1.0 + 0.5 = 1.5; log-ratios = [0.2, -0.1] (sum 0.1); pi / pi_ref = e^0.1 = 1.1051709
#   row 1: NLL = 3.5; summed log-ratio = -1.0 + 0.0 + 0.5 = -0.5
LOGPS = [[-1.0, -0.5, -9.0], [-2.0, -1.0, -0.5]]
REF_LOGPS = [[-1.2, -0.4, -9.0], [-1.0, -1.0, -1.0]]
MASK = [[1, 1, 0], [1, 1, 1]]
ADVANTAGES = [2.0, -0.5]
E01, E02, EM01 = math.exp(0.1), math.exp(0.2), math.exp(-0.1)

# (loss of row 0, d loss / d logps of row 0) for each variant; row 1 is 0 with 0 gradient everywhere
EXPECTED = {
    # 2 * e^0.1 * 1.5; gradient -A * w on each completion token
    "alol": (2 * E01 * 1.5, [-2 * E01, -2 * E01, 0.0]),
    # 2 * (e^0.2 * 1.0 + e^-0.1 * 0.5); gradient -A * w_t
    "alol_seq": (2 * (E02 * 1.0 + EM01 * 0.5), [-2 * E02, -2 * EM01, 0.0]),
    # 2 * 1.5
    "alol_ref_free": (3.0, [-2.0, -2.0, 0.0]),
    # 2 * 1.5 + 0.5 * 0.1; gradient -A + kl_coef
    "alol_kl": (3.05, [-1.5, -1.5, 0.0]),
}


def _inputs():
    logps = torch.tensor(LOGPS, dtype=torch.float64, requires_grad=True)
    return logps, torch.tensor(REF_LOGPS, dtype=torch.float64), torch.tensor(MASK), torch.tensor(ADVANTAGES)


@pytest.mark.parametrize("variant", list(EXPECTED))
def test_loss_and_gradient_match_hand_computed_values(variant):
    logps, ref_logps, mask, advantages = _inputs()
    loss, metrics = alol_loss(logps, ref_logps, mask, advantages, variant=variant, clip_epsilon=0.9, kl_coef=0.5)
    expected_loss, expected_grad = EXPECTED[variant]
    torch.testing.assert_close(loss, torch.tensor([expected_loss, 0.0], dtype=torch.float64))
    loss.sum().backward()
    torch.testing.assert_close(logps.grad, torch.tensor([expected_grad, [0.0, 0.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(metrics["nll"], torch.tensor([1.5, 3.5], dtype=torch.float64))
    torch.testing.assert_close(metrics["kl"], torch.tensor([0.1, -0.5], dtype=torch.float64))


@pytest.mark.parametrize("variant", ["alol", "alol_ref_free", "alol_kl"])
def test_sequence_reference_log_probs_give_the_same_loss_and_gradient(variant):
    # The reference's sequence log-probabilities: row 0 -1.2 - 0.4 = -1.6, row 1 -3.0
    logps, _, mask, advantages = _inputs()
    ref_sums = torch.tensor([-1.6, -3.0], dtype=torch.float64)
    loss, metrics = alol_loss(logps, ref_sums, mask, advantages, variant=variant, clip_epsilon=0.9, kl_coef=0.5)
    expected_loss, expected_grad = EXPECTED[variant]
    torch.testing.assert_close(loss, torch.tensor([expected_loss, 0.0], dtype=torch.float64))
    loss.sum().backward()
    torch.testing.assert_close(logps.grad, torch.tensor([expected_grad, [0.0, 0.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(metrics["kl"], torch.tensor([0.1, -0.5], dtype=torch.float64))


def test_per_token_variant_refuses_sequence_reference_log_probs():
    logps, _, mask, advantages = _inputs()
    with pytest.raises(ValueError, match="'alol_seq' needs per-token"):
        alol_loss(logps, torch.tensor([-1.6, -3.0]), mask, advantages, variant="alol_seq")


def test_importance_weights_are_clipped_and_reported():
    logps, ref_logps, mask, advantages = _inputs()
    # eps = 0.05: e^0.1 = 1.105 is clamped to 1.05; row 1's e^-0.5 = 0.607 to 0.95
    loss, metrics = alol_loss(logps, ref_logps, mask, advantages, variant="alol", clip_epsilon=0.05)
    torch.testing.assert_close(loss, torch.tensor([2 * 1.05 * 1.5, 0.0], dtype=torch.float64))
    torch.testing.assert_close(metrics["importance_weight"], torch.tensor([1.05, 0.95], dtype=torch.float64))
    torch.testing.assert_close(metrics["clipped"], torch.tensor([1.0, 1.0], dtype=torch.float64))

    # Per token (eps = 0.15): row 0's e^0.2 = 1.221 is clamped to 1.15, e^-0.1 = 0.905 is not
    loss, metrics = alol_loss(logps, ref_logps, mask, advantages, variant="alol_seq", clip_epsilon=0.15)
    torch.testing.assert_close(loss[0], torch.tensor(2 * (1.15 * 1.0 + EM01 * 0.5), dtype=torch.float64))
    torch.testing.assert_close(metrics["clipped"][0], torch.tensor(0.5, dtype=torch.float64))
    torch.testing.assert_close(metrics["importance_weight"][0], torch.tensor((1.15 + EM01) / 2, dtype=torch.float64))


@pytest.mark.parametrize("variant", ["alol", "alol_seq"])
def test_at_policy_equal_reference_weighted_variants_are_advantage_times_nll(variant):
    torch.manual_seed(0)
    logps = -torch.rand(4, 6, dtype=torch.float64)
    mask = torch.rand(4, 6) > 0.3
    advantages = torch.tensor([1.5, -1.0, 0.25, 0.0], dtype=torch.float64)
    loss, metrics = alol_loss(logps, logps.clone(), mask, advantages, variant=variant)
    nll = -(logps * mask).sum(-1)
    torch.testing.assert_close(loss, advantages.clamp(min=0) * nll)
    assert torch.all(metrics["importance_weight"][mask.any(-1)] == 1.0)


def test_importance_weight_carries_no_gradient():
    # The weight is a constant of the gradient (Eq. 3), so nothing flows into the reference; that d loss / d logps
    # is -A+ * w, with no term from differentiating the weight, is checked by the hand-computed gradients above
    logps, ref_logps, mask, advantages = _inputs()
    ref_logps.requires_grad_(True)
    loss, _ = alol_loss(logps, ref_logps, mask, advantages, variant="alol")
    loss.sum().backward()
    assert ref_logps.grad is None or torch.count_nonzero(ref_logps.grad) == 0


def test_reference_free_variant_needs_no_reference():
    logps, _, mask, advantages = _inputs()
    loss, metrics = alol_loss(logps, None, mask, advantages, variant="alol_ref_free")
    torch.testing.assert_close(loss, torch.tensor([3.0, 0.0], dtype=torch.float64))
    assert "kl" not in metrics and "importance_weight" not in metrics


def test_bad_arguments_are_refused():
    logps, ref_logps, mask, advantages = _inputs()
    with pytest.raises(ValueError, match="variant"):
        alol_loss(logps, ref_logps, mask, advantages, variant="ppo")
    with pytest.raises(ValueError, match="reference"):
        alol_loss(logps, None, mask, advantages, variant="alol")
