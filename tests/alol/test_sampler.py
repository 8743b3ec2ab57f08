from collections import Counter

import pytest
import torch

from trl_offline.alol.sampler import PriorityAdvantageSampler, positive_advantage_indices


# Nine rows with positive advantages of different sizes, and five (zero or negative) that must never be drawn
ADVANTAGES = [3.0, -1.0, 0.5, 0.0, 2.0, 1.0, -0.2, 4.0, 0.25, 1.5, 0.0, 2.5, 0.75, -3.0]
POSITIVE_ROWS = [0, 2, 4, 5, 7, 8, 9, 11, 12]


def _draws(sampler: PriorityAdvantageSampler, epochs: int) -> list[int]:
    return [row for _ in range(epochs) for row in sampler]


def _chi_square(counts: Counter, probabilities: dict[int, float], total: int) -> float:
    return sum((counts[row] - total * p) ** 2 / (total * p) for row, p in probabilities.items())


def test_positive_advantage_indices_keeps_rows_with_a_positive_advantage_in_order():
    assert positive_advantage_indices(ADVANTAGES) == POSITIVE_ROWS
    assert positive_advantage_indices(torch.tensor(ADVANTAGES)) == POSITIVE_ROWS


def test_len_is_the_number_of_positive_rows():
    sampler = PriorityAdvantageSampler(ADVANTAGES)
    assert len(sampler) == len(POSITIVE_ROWS)
    assert len(list(sampler)) == len(POSITIVE_ROWS)


def test_draw_frequencies_are_proportional_to_the_positive_advantage():
    sampler = PriorityAdvantageSampler(ADVANTAGES, seed=0)
    draws = _draws(sampler, epochs=2000)  # 18,000 draws
    counts = Counter(draws)
    assert set(counts) <= set(POSITIVE_ROWS)  # zero and negative advantages are never drawn

    positive_total = sum(a for a in ADVANTAGES if a > 0)
    expected = {row: ADVANTAGES[row] / positive_total for row in POSITIVE_ROWS}
    # Pearson's goodness of fit over the 9 positive rows has 8 degrees of freedom; its 0.999 quantile is 26.12, so a
    # correct sampler fails this (fixed-seed) check with probability 0.001.
    assert _chi_square(counts, expected, len(draws)) < 26.12
    # The same check has the power to reject a wrong distribution: uniform over the positive rows is far off
    uniform = {row: 1 / len(POSITIVE_ROWS) for row in POSITIVE_ROWS}
    assert _chi_square(counts, uniform, len(draws)) > 1000


def test_draws_are_deterministic_per_seed_and_epoch_and_differ_across_epochs():
    sampler = PriorityAdvantageSampler(ADVANTAGES, seed=7)
    first_epoch, second_epoch = list(sampler), list(sampler)  # each iter() moves to the next epoch
    assert first_epoch != second_epoch

    again = PriorityAdvantageSampler(ADVANTAGES, seed=7)
    assert list(again) == first_epoch
    again.set_epoch(1)
    assert list(again) == second_epoch
    again.set_epoch(1)  # as the Trainer does before each epoch: setting the same epoch twice repeats its draws
    assert list(again) == second_epoch

    assert list(PriorityAdvantageSampler(ADVANTAGES, seed=8)) != first_epoch
    # Seeds are mixed with the epoch, not added to it: seed 8 at epoch 0 is not seed 7 at epoch 1
    assert list(PriorityAdvantageSampler(ADVANTAGES, seed=8)) != second_epoch


def test_a_single_positive_row_is_all_that_is_drawn():
    sampler = PriorityAdvantageSampler([-1.0, 0.0, 0.3, 0.0])
    assert _draws(sampler, epochs=50) == [2] * 50


def test_works_as_a_dataloader_sampler():
    sampler = PriorityAdvantageSampler(ADVANTAGES, seed=1)
    loader = torch.utils.data.DataLoader(list(range(len(ADVANTAGES))), batch_size=4, sampler=sampler)
    batches = list(loader)
    assert sum(len(batch) for batch in batches) == len(POSITIVE_ROWS)
    assert set(torch.cat(batches).tolist()) <= set(POSITIVE_ROWS)


@pytest.mark.parametrize(
    "advantages,match",
    [
        ([-1.0, 0.0, -0.5], "No row has a positive advantage"),
        ([], "No row has a positive advantage"),
        ([1.0, float("nan"), 2.0], r"finite; rows \[1\]"),
        (torch.tensor([float("inf"), 1.0]), r"finite; rows \[0\]"),
        (torch.ones(2, 2), "one number per row"),
    ],
)
@pytest.mark.parametrize("build", [PriorityAdvantageSampler, positive_advantage_indices])
def test_bad_advantages_are_clear_errors(build, advantages, match):
    with pytest.raises(ValueError, match=match):
        build(advantages)
