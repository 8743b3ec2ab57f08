import torch
from launch_utils import logged_steps, run_recipe
from transformers import AutoModelForCausalLM


def test_alol_recipe_runs_offline_with_its_tiny_config(tmp_path):
    # The command printed in the recipe's docstring, shortened to a few steps
    run_recipe(
        "alol.py", "--config", "recipes/configs/alol_tiny.yaml", "--max_steps", "3", "--output_dir", str(tmp_path)
    )
    AutoModelForCausalLM.from_pretrained(str(tmp_path))
    card = (tmp_path / "README.md").read_text()
    assert "A-LoL" in card and "2305.14718" in card


def test_alol_recipe_scores_with_a_reward_function_named_on_the_command_line(tmp_path):
    # The kit's labelled rows are rescored by the function; with the labels alone every logged batch mean would be a
    # multiple of 1/16 (16 rows a batch, rewards 0.0 or 1.0)
    result = run_recipe(
        "alol.py",
        "--config", "recipes/configs/alol_tiny.yaml",
        "--dataset_name", "offline_kit:labelled_prompt_completion",
        "--reward_funcs", "trl_offline.offline_kit.sort_reward_func",
        "--max_steps", "3",
        "--logging_steps", "1",
        "--value_num_prompts", "16",
        "--output_dir", str(tmp_path),
    )  # fmt: skip
    logs = logged_steps(result.stdout)
    assert float(logs[0]["value/num_prompts"]) == 16
    batch_means = [float(log["reward/mean"]) * 16 for log in logs if "reward/mean" in log]
    assert len(batch_means) == 3
    assert any(abs(m - round(m)) > 1e-3 for m in batch_means)


def test_alol_recipe_trains_under_zero3_on_two_processes(tmp_path):
    # ZeRO-3 shards the parameters before `train()`: the reference passes (greedy generations for the value targets,
    # prompt features, per-token log-probs) run through a DeepSpeed inference engine with every process taking part
    result = run_recipe(
        "alol.py",
        "--config", "recipes/configs/alol_tiny.yaml",
        "--dataset_name", "offline_kit:labelled_conversational_prompt_completion",
        "--reward_funcs", "trl_offline.offline_kit.sort_reward_func",
        "--value_num_prompts", "32",
        "--max_steps", "3",
        "--warmup_steps", "0",
        "--logging_steps", "1",
        "--output_dir", str(tmp_path),
        accelerate_config="zero3_cpu.yaml",
    )  # fmt: skip
    steps = [log for log in logged_steps(result.stdout) if "loss" in log]
    # The first step's forward comes before any update, so the policy is the reference: the log-probs precomputed
    # through the inference engine agree with the training engine's
    assert abs(float(steps[0]["kl"])) < 1e-4
    assert abs(float(steps[0]["importance_weight/mean"]) - 1.0) < 1e-4
    trained = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    initial = AutoModelForCausalLM.from_pretrained(str(tmp_path / "offline-kit-llama"))
    assert not torch.equal(trained.model.embed_tokens.weight, initial.model.embed_tokens.weight)
