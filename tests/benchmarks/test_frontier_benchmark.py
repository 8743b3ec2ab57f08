"""CI runs the quick frontier benchmark and checks that its record is whole and consistent (not its numbers)."""

import math
import sys

import pytest
from launch_utils import ROOT, run_quick_benchmark


sys.path.insert(0, str(ROOT / "benchmarks"))
from frontier import exact_value_rows  # noqa: E402


def test_exact_value_rows_subtract_the_soft_value_from_the_range_scaled_thumbs():
    # One prompt, its expert answer at p = 0.2 under the reference, one thumbs up in four: r' = 0.75 / -0.25 and,
    # at beta 0.5, V* = 0.5 * log(0.2 e^1.5 + 0.8 e^-0.5) = 0.5 * log(0.8963378 + 0.4852245) = 0.1616078
    prompt = [{"role": "user", "content": "dcab"}]
    rows = [{"prompt": prompt, "completion": c, "label": c == "abcd"} for c in ("abcd", "dcab", "dcba", "abce")]
    rewards = [row["reward"] for row in exact_value_rows(rows, 0.5, {"dcab": math.log(0.2)})]
    assert rewards == pytest.approx([0.75 - 0.1616078, -0.25 - 0.1616078, -0.25 - 0.1616078, -0.25 - 0.1616078])


def test_quick_frontier_benchmark_records_every_run_and_a_consistent_frontier(tmp_path):
    record = run_quick_benchmark("frontier.py", tmp_path / "frontier.json")
    summary, sweeps = record["summary"], record["sweeps"]
    assert set(sweeps) == {
        "dro",
        "dro_std",
        "dro_policy_head",
        "dro_exact_value",
        "dro_kto_lr",
        "kto",
        "dpo",
        "alol_kl",
    }
    assert record["command"].startswith("python benchmarks/frontier.py --quick")
    # The defaults marked are the configs' own
    assert (sweeps["dro"]["default"], sweeps["dro_std"]["default"]) == (0.1, 1.0)
    assert sweeps["kto"]["default"] == sweeps["dpo"]["default"] == sweeps["alol_kl"]["default"] == 0.1

    # Every sweep point ran, on every seed, and scored
    expected = {f"{name}@{value:g}" for name, sweep in sweeps.items() for value in sweep["values"]}
    assert set(summary["runs"]) == expected
    assert {"dro@0.1", "kto@0.1", "dpo@0.1", "alol_kl@0.1", "dro_std@1"} <= expected  # the defaults among them
    for seed in record["seeds"].values():
        assert set(seed["runs"]) == expected
        assert set(seed["swap"]) == {"kto", "dro"}
        assert (seed["swap"]["kto"]["trainer"], seed["swap"]["dro"]["trainer"]) == ("KTOTrainer", "DROTrainer")
        assert seed["swap"]["kto"]["learning_rate"] == seed["swap"]["dro"]["learning_rate"]
        assert seed["reference"]["kl"] == 0.0  # the reference against itself
        assert len(seed["expert_logps"]) == record["settings"]["held_out"]
        assert all(logp <= 0 for logp in seed["expert_logps"])
    for key, run in summary["runs"].items():
        assert run["kl"] >= -1e-6 and run["kl_se"] >= 0
        for metric in ("sampled_reward", "greedy_reward"):
            assert 0.0 <= run[metric] <= 1.0
        if run["sweep"].startswith("dro") and run["sweep"] != "dro_exact_value":  # its value against the soft value
            assert -1.0 <= run["value_fit"]["pearson"] <= 1.0 and run["value_fit"]["rmse"] >= 0
        assert sum(run["answer_kinds"].values()) == pytest.approx(1.0)
    for seed in record["seeds"].values():  # with the exact value, DRO's own value network stayed at 0
        assert seed["runs"]["dro_exact_value@0.1"]["largest_value"] < 1e-6
    assert record["seeds"]["0"]["runs"]["dro_std@1"]["value_fit"]["reward_scale"] < 1.0  # std of 0/1 labels

    # The optimum: reward and KL both rise as beta falls, from the reference's mean p(x) at large beta
    optimum = summary["optimum"]
    betas = [point["beta"] for point in optimum]
    assert betas == sorted(betas, reverse=True)
    for weaker, stronger in zip(optimum, optimum[1:]):
        assert stronger["reward"] >= weaker["reward"] - 1e-12 and stronger["kl"] >= weaker["kl"] - 1e-12
    assert optimum[-1]["kl"] > optimum[0]["kl"]
    # at the largest beta the optimum is the reference: its reward is the mean p(x) of the pooled prompts
    expert_p = [math.exp(logp) for seed in record["seeds"].values() for logp in seed["expert_logps"]]
    assert optimum[0]["reward"] == pytest.approx(sum(expert_p) / len(expert_p), abs=0.01)
    assert optimum[0]["kl"] < 0.01

    # The reward at each KL budget is the interpolation between the two points it quotes, and exists exactly where
    # the budget lies within the sweep's KL range
    checked = 0
    for name in sweeps:
        points = [run for run in summary["runs"].values() if run["sweep"] == name]
        low, high = min(p["kl"] for p in points), max(p["kl"] for p in points)
        for budget in record["settings"]["kl_budgets"]:
            cell = summary["budgets"][name][f"{budget:g}"]
            assert (cell is not None) == (low <= budget <= high), (name, budget)
            if cell is None:
                continue
            a, b = (summary["runs"][key] for key in cell["between"])
            assert a["kl"] <= budget <= b["kl"]
            weight = (budget - a["kl"]) / (b["kl"] - a["kl"])
            for metric in ("sampled_reward", "greedy_reward"):
                assert cell[metric] == pytest.approx(a[metric] + weight * (b[metric] - a[metric]))
            checked += 1
    assert checked > 0
    # The optimum's reward within each budget: the best there is, so no higher as the budget shrinks
    optimum_at_budgets = [
        summary["budgets"]["optimum"][f"{b:g}"]["sampled_reward"] for b in record["settings"]["kl_budgets"]
    ]
    assert (
        optimum_at_budgets == sorted(optimum_at_budgets)
        and 0.0 <= optimum_at_budgets[0] <= optimum_at_budgets[-1] <= 1.0
    )
