"""A-LoL learns from rewarded data on the offline kit's sorting task, where the reward is a known function of the
response (`sort_reward`): the mean reward of the model's greedy answers to unseen prompts must rise well above the
starting model's and above the average answer it learned from."""

import pytest

from trl_offline.offline_kit import build_tiny_model
from trl_offline.quickstart import run_alol


@pytest.mark.parametrize("seed", [0, 1])
def test_alol_raises_the_reward_of_greedy_answers(tmp_path, seed):
    # The quickstart's A-LoL run, shortened: 150 steps of 32 on 1024 rows of mixed quality (a quarter expert answers),
    # a few seconds on 2 CPU cores. Measured here: 0.955 (seed 0) and 0.880 (seed 1) after, from 0.0 before, on data
    # whose answers average 0.56-0.58.
    model_path = build_tiny_model(str(tmp_path / "base-model"), seed=seed)
    results = run_alol(
        model_path,
        str(tmp_path / "alol"),
        max_steps=150,
        num_rows=1024,
        num_held_out=64,
        seed=seed,
        save=False,
        verbose=False,
    )
    # About half the rows beat the value head's estimate of the data's average answer (the expert answers and most of
    # the one-letter corruptions); A-LoL trains on those only
    assert 0.3 < results["positive_fraction"] < 0.8
    assert results["reward_after"] >= results["reward_before"] + 0.5, results
    # Offline RL, not imitation: better than the average answer in the data it learned from
    assert results["reward_after"] >= results["data_reward"] + 0.15, results
