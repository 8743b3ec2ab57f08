"""The scale DRO's rewards are put on before training, and what `beta` then means.

DRO's optimum is `pi*(y|x) ∝ pi_ref(y|x) * exp(r(x, y) / beta)` (Richemond et al. 2024, the KL-regularised optimum
that Eq. 4's minimiser satisfies), so between two answers the optimum moves the log-odds by `(r1 - r2) / beta` nats
from the reference's. `beta` is therefore only meaningful on a known reward scale:

- `"range"` (the default): rewards centred on their mean and divided by their range (max - min), so the best and the
  worst training answer differ by exactly 1 and `1 / beta` is the largest log-odds shift the optimum makes. Thumbs up
  and down differ by 1 whatever their shares (5% or 50% up), so `beta` moves the policy the same distance on any
  label set.
- `"std"`: mean 0 and variance 1, as the paper does with UltraFeedback's scores. Binary labels with a share `p` up then
  differ by `1 / sqrt(p (1 - p))`: 2.0 at 50% up, 4.6 at 5%, so the same `beta` moves the policy further on rarer
  labels.
- `"none"`: the rewards as given.
"""

import math

import torch


REWARD_SCALINGS = ("range", "std", "none")
# `beta` when the config leaves it unset: 10 nats between the best and the worst answer on the range scale (where DRO,
# swapped in for KTO with both at their defaults, ended above it: benchmarks/frontier.py); the paper's tau on its
# standardised scale
DEFAULT_BETA = {"range": 0.1, "std": 1.0, "none": 0.1}
# Bounds of the optimum's largest log-odds shift outside which the trainer warns: under 1 nat (odds x2.7) the optimum
# is barely the reference; above 15 nats (odds x3e6) KL(pi || pi_ref) grew with no gain in reward in our sweeps
WEAK_LOG_ODDS, STRONG_LOG_ODDS = 1.0, 15.0


class RewardStatistics:
    """The shift and scale of a reward scaling, computed on the training rewards, and their raw range.

    Args:
        rewards: `(N,)` the training rewards (or a stream's first rows), as given.
        scaling: One of `REWARD_SCALINGS`.
    """

    def __init__(self, rewards: torch.Tensor, scaling: str):
        if scaling not in REWARD_SCALINGS:
            raise ValueError(f"`reward_scaling` must be one of {REWARD_SCALINGS}, got {scaling!r}.")
        rewards = rewards.double()
        self.mean = rewards.mean().item()
        self.std = rewards.std(unbiased=False).item()
        self.range = (rewards.max() - rewards.min()).item()
        self.all_equal = self.range < 1e-12
        if scaling == "none":
            self.shift, self.scale = 0.0, 1.0
        elif self.all_equal:  # only centred (the trainer warns: nothing to learn)
            self.shift, self.scale = self.mean, 1.0
        else:
            self.shift, self.scale = self.mean, self.range if scaling == "range" else self.std

    @property
    def scaled_range(self) -> float:
        """The range of the rewards the loss sees."""
        return self.range / self.scale


def optimum_log_odds(reward_range: float, beta: float) -> float:
    """The largest log-odds shift, in nats, that the optimum `pi_ref * exp(r / beta)` makes between two answers whose
    rewards differ by `reward_range` (on the scale the loss sees)."""
    return reward_range / beta


def describe_strength(reward_range: float, beta: float) -> tuple[str, bool]:
    """A sentence on how far `beta` lets the policy move on rewards spanning `reward_range`, and whether it falls
    outside `[WEAK_LOG_ODDS, STRONG_LOG_ODDS]` (a warning)."""
    nats = optimum_log_odds(reward_range, beta)
    sentence = (
        f"DRO's optimum pi_ref * exp(r / beta) at beta={beta:g} on rewards spanning {reward_range:.3g} (as the loss "
        f"sees them) shifts the log-odds of the best answer against the worst by up to {nats:.3g} nats (odds "
        f"x{math.exp(min(nats, 700)):.3g})."
    )
    if nats < WEAK_LOG_ODDS:
        return sentence + (
            f" Under {WEAK_LOG_ODDS:g} nat the optimum barely differs from the reference: lower `beta`, or scale the "
            "rewards (`reward_scaling`)."
        ), True
    if nats > STRONG_LOG_ODDS:
        return sentence + (
            f" Above {STRONG_LOG_ODDS:g} nats KL(pi || pi_ref) can run away with no gain in reward: raise `beta`."
        ), True
    return sentence, False
