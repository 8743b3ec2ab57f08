import pytest
import torch
from launch_utils import logged_steps, run_recipe
from transformers import AutoModelForCausalLM

from trl_offline.value import PromptValueModel


def test_dro_recipe_runs_offline_with_its_tiny_config(tmp_path):
    # The command printed in the recipe's docstring, shortened to a few steps
    run_recipe(
        "dro.py", "--config", "recipes/configs/dro_tiny.yaml", "--max_steps", "3", "--output_dir", str(tmp_path)
    )
    AutoModelForCausalLM.from_pretrained(str(tmp_path))
    PromptValueModel.from_pretrained(str(tmp_path / "value"))
    card = (tmp_path / "README.md").read_text()
    assert "DRO" in card and "2405.19107" in card


def _saved(folder, value_folder="value"):
    policy = AutoModelForCausalLM.from_pretrained(str(folder))
    value = PromptValueModel.from_pretrained(str(folder / value_folder))
    return dict(policy.named_parameters()), dict(value.named_parameters())


def test_dro_recipe_trains_saves_and_resumes_under_zero3_on_two_processes(tmp_path):
    # ZeRO-3 shards the policy and its value network together: the reference log-probs are precomputed through an
    # inference engine, both networks train, the saved policy and value are full (16-bit gather on save), and a
    # resume from a checkpoint continues the same run, value network and optimizer state included
    args = [
        "--config", "recipes/configs/dro_tiny.yaml",
        "--max_steps", "4", "--warmup_steps", "0", "--logging_steps", "1",
        "--save_strategy", "steps", "--save_steps", "2",
    ]  # fmt: skip
    straight = run_recipe("dro.py", *args, "--output_dir", str(tmp_path / "a"), accelerate_config="zero3_cpu.yaml")
    steps = [log for log in logged_steps(straight.stdout) if "loss" in log]
    assert len(steps) == 4
    # Step 1 runs before any update: the precomputed reference log-probs agree with the training engine's
    assert abs(float(steps[0]["log_ratio/mean"])) < 1e-4 and float(steps[0]["value/mean"]) == 0.0

    checkpoint = tmp_path / "a" / "checkpoint-2"
    resumed = run_recipe(
        "dro.py", *args, "--output_dir", str(tmp_path / "b"), "--resume_from_checkpoint", str(checkpoint),
        accelerate_config="zero3_cpu.yaml",
    )  # fmt: skip
    assert [log["loss"] for log in logged_steps(resumed.stdout) if "loss" in log] == [s["loss"] for s in steps[2:]]

    policy, value = _saved(tmp_path / "a")
    resumed_policy, resumed_value = _saved(tmp_path / "b")
    initial_policy, initial_value = _saved(tmp_path / "a" / "offline-kit-llama", ".")
    for name, param in policy.items():
        torch.testing.assert_close(resumed_policy[name], param, msg=name)
    for name, param in value.items():
        torch.testing.assert_close(resumed_value[name], param, msg=name)
    assert not torch.equal(policy["model.embed_tokens.weight"], initial_policy["model.embed_tokens.weight"])
    assert not torch.equal(value["body.embed_tokens.weight"], initial_value["body.embed_tokens.weight"])
    assert value["head.weight"].abs().sum() > 0  # the head starts at zero


def test_dro_recipe_under_ddp_matches_one_process_with_the_same_global_batch(tmp_path):
    # DDP sees one model, the policy with its value network: both gradients are reduced (the value's forward runs
    # inside the wrapped forward), and 2 processes x 16 rows follow the loss curve of 1 process x 32 rows
    args = ["--config", "recipes/configs/dro_tiny.yaml", "--max_steps", "4", "--logging_steps", "1"]
    ddp = run_recipe("dro.py", *args, "--output_dir", str(tmp_path / "ddp"), accelerate_config="ddp_cpu.yaml")
    single = run_recipe("dro.py", *args, "--per_device_train_batch_size", "32", "--output_dir", str(tmp_path / "one"))
    ddp_losses = [float(log["loss"]) for log in logged_steps(ddp.stdout) if "loss" in log]
    single_losses = [float(log["loss"]) for log in logged_steps(single.stdout) if "loss" in log]
    assert len(ddp_losses) == 4
    assert ddp_losses == pytest.approx(single_losses, rel=1e-3)
    policy, value = _saved(tmp_path / "ddp")
    single_policy, single_value = _saved(tmp_path / "one")
    for saved, single_saved in ((policy, single_policy), (value, single_value)):
        for name, param in saved.items():
            torch.testing.assert_close(single_saved[name], param, rtol=1e-3, atol=1e-5, msg=name)
