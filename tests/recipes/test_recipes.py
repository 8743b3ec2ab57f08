from launch_utils import run_recipe
from transformers import AutoModelForCausalLM


def test_iqlearn_recipe_runs_offline_with_its_tiny_config(tmp_path):
    # The command printed in the recipe's docstring, shortened to a few steps
    run_recipe(
        "iqlearn.py",
        "--config",
        "recipes/configs/iqlearn_tiny.yaml",
        "--max_steps",
        "3",
        "--output_dir",
        str(tmp_path),
    )
    AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert "IQLearn" in (tmp_path / "README.md").read_text()


def test_quickstart_trains_and_reports(tmp_path):
    from trl_offline.quickstart import main

    results = main(["--max_steps", "4", "--output_dir", str(tmp_path)])
    assert set(results) == {"iqlearn", "alol", "dro"}
    assert set(results["iqlearn"]) == {"reward_before", "reward_after", "expert_ranked_above_corrupted"}
    assert set(results["alol"]) == {"data_reward", "positive_fraction", "reward_before", "reward_after"}
    assert set(results["dro"]) == {
        "data_thumbs_up", "expert_share_before", "expert_share_after", "reward_before", "reward_after"
    }  # fmt: skip
    assert all(0.0 <= value <= 1.0 for run in results.values() for value in run.values())
    assert 0.0 < results["alol"]["positive_fraction"] < 1.0
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "iqlearn"))
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "alol"))
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "dro"))
    assert (tmp_path / "dro" / "value" / "value_head.safetensors").is_file()


def test_quickstart_runs_the_alol_part_alone(tmp_path, capsys):
    from trl_offline.quickstart import main

    results = main(["--trainer", "alol", "--max_steps", "2", "--seed", "1", "--output_dir", str(tmp_path)])
    assert set(results) == {"alol"}
    assert all(0.0 <= value <= 1.0 for value in results["alol"].values())
    assert "A-LoL quickstart" in capsys.readouterr().out
    assert not (tmp_path / "iqlearn").exists()
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "alol"))
