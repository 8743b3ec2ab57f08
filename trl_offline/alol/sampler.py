"""Which rows A-LoL trains on, and how often.

A-LoL (Baheti et al. 2024, arXiv 2305.14718) learns only from rows with a positive advantage `A = R(x, y) - V_ref(x)`:
the others are worse than what the reference already does, and dropping them is the "leftover lunch". With priority
sampling a row is drawn with probability `A+ / sum(A+)` (with replacement), so the rows that beat the reference most
are seen most often, and the number of training steps is scaled by the fraction of positive rows: an epoch is as many
draws as there are positive rows.
"""

from collections.abc import Iterator, Sequence

import torch


# An odd 64-bit multiplier (2^64 / golden ratio): seed -> seed * K mod 2^64 is a bijection that spreads nearby seeds apart
_GOLDEN_RATIO_64 = 0x9E3779B97F4A7C15


def _positive_advantages(advantages: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """`max(A, 0)` as a float64 `(N,)` tensor, after checking there is something to learn from."""
    advantages = torch.as_tensor(advantages).detach().cpu().to(torch.float64)
    if advantages.dim() != 1:
        raise ValueError(f"Advantages must be one number per row, got shape {tuple(advantages.shape)}.")
    bad = (~torch.isfinite(advantages)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"Advantages must be finite; rows {bad[:10]} are not (first: {advantages[bad[0]].item()}).")
    if not bool((advantages > 0).any()):
        raise ValueError(
            f"No row has a positive advantage (A = R - V_ref > 0) among {len(advantages)} rows: A-LoL trains only on "
            "those, so there is nothing to learn from. Check the rewards and the value head's fit."
        )
    return advantages.clamp(min=0.0)


def positive_advantage_indices(advantages: Sequence[float] | torch.Tensor) -> list[int]:
    """The rows with `A > 0`, in order: what A-LoL trains on when priority sampling is off.

    Raises `ValueError` if an advantage is not finite or no row has `A > 0`.
    """
    return (_positive_advantages(advantages) > 0).nonzero().flatten().tolist()


class PriorityAdvantageSampler(torch.utils.data.Sampler[int]):
    """A-LoL's priority sampling: draw rows with probability proportional to their positive advantage A+ (with
    replacement); an epoch is as many draws as there are positive rows, so the number of steps matches one pass
    over the positive rows.

    The draws of an epoch depend only on `seed` and the epoch number, so every process of a distributed run draws the
    same sequence and accelerate's batch sharding splits it between them. Like accelerate's `SeedableRandomSampler`,
    `set_epoch` picks the epoch (the Trainer calls it before each one) and each `iter()` moves on to the next, so a
    plain DataLoader also gets new draws every epoch.

    Args:
        advantages (sequence of `float` or `torch.Tensor` of shape `(N,)`): `A = R(x, y) - V_ref(x)` of every row.
        seed (`int`): with the epoch, seeds the draws. They are mixed so that, unlike `DistributedSampler`'s
            `seed + epoch`, seed 1 at epoch 0 does not repeat seed 0 at epoch 1.
    """

    def __init__(self, advantages: Sequence[float] | torch.Tensor, seed: int = 0):
        positive = _positive_advantages(advantages)  # (N,)
        # Inverse-CDF sampling: row i owns [cdf[i-1], cdf[i]), empty when A+ = 0 (torch.multinomial caps N at 2^24)
        self.cumulative = positive.cumsum(0)  # (N,)
        self.num_positive = int((positive > 0).sum())
        self.last_positive = int(positive.nonzero().max())
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_positive

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed((self.seed * _GOLDEN_RATIO_64 + self.epoch) % 2**64)
        self.epoch += 1
        total = self.cumulative[-1]
        points = torch.rand(self.num_positive, generator=generator, dtype=torch.float64) * total  # (n,) in [0, total)
        rows = torch.searchsorted(self.cumulative, points, right=True)  # (n,)
        # Rounding can put a point exactly at `total`, past the last row that has any mass
        return iter(rows.clamp(max=self.last_positive).tolist())
