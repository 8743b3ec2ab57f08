import math

import pytest
import torch

from trl_offline import DROConfig
from trl_offline.dro.reward_scaling import RewardStatistics, describe_strength, optimum_log_odds


REWARDS = torch.tensor([0.0, 1.0, 3.0, 4.0])  # mean 2, range 4, population std sqrt(2.5)


def test_each_scaling_by_hand():
    scaled = {}
    for scaling in ("range", "std", "none"):
        statistics = RewardStatistics(REWARDS, scaling)
        scaled[scaling] = [(r - statistics.shift) / statistics.scale for r in REWARDS.tolist()]
        assert (statistics.mean, statistics.range) == (2.0, 4.0)
        assert statistics.std == pytest.approx(math.sqrt(2.5))
    assert scaled["range"] == pytest.approx([-0.5, -0.25, 0.25, 0.5])
    assert scaled["std"] == pytest.approx([x / math.sqrt(2.5) for x in (-2.0, -1.0, 1.0, 2.0)])
    assert scaled["none"] == REWARDS.tolist()
    assert RewardStatistics(REWARDS, "range").scaled_range == 1.0
    assert RewardStatistics(REWARDS, "std").scaled_range == pytest.approx(4 / math.sqrt(2.5))


def test_equal_rewards_are_only_centred_and_a_bad_scaling_is_refused():
    statistics = RewardStatistics(torch.full((3,), 2.5), "range")
    assert statistics.all_equal and (statistics.shift, statistics.scale) == (2.5, 1.0)
    with pytest.raises(ValueError, match="`reward_scaling` must be one of"):
        RewardStatistics(REWARDS, "minmax")
    with pytest.raises(ValueError, match="`reward_scaling` must be one of"):
        DROConfig(output_dir="unused", use_cpu=True, bf16=False, reward_scaling="minmax")


def test_the_optimum_shifts_the_log_odds_by_the_reward_gap_over_beta():
    # pi* = pi_ref * exp(r / beta) / Z on two answers: the log-odds move by (r1 - r2) / beta
    pi_ref, rewards, beta = torch.tensor([0.8, 0.2]), torch.tensor([0.0, 1.0]), 0.25
    pi_star = pi_ref * torch.exp(rewards / beta)
    pi_star = pi_star / pi_star.sum()
    shift = (pi_star[1] / pi_star[0]).log() - (pi_ref[1] / pi_ref[0]).log()
    assert optimum_log_odds(1.0, beta) == pytest.approx(shift.item()) == pytest.approx(4.0)
    assert describe_strength(1.0, 0.1)[1] is False
    assert describe_strength(1.0, 2.0)[1] is True and describe_strength(1.0, 0.05)[1] is True


def test_beta_defaults_follow_the_scaling():
    assert DROConfig(output_dir="unused", use_cpu=True, bf16=False).beta == 0.1
    assert (
        DROConfig(output_dir="unused", use_cpu=True, bf16=False, reward_scaling="std").beta == 1.0
    )  # the paper's tau
    assert DROConfig(output_dir="unused", use_cpu=True, bf16=False, reward_scaling="std", beta=0.3).beta == 0.3
