import sys
from pathlib import Path

import pytest
from launch_utils import ROOT, logged_steps, run_recipe
from transformers import AutoModelForCausalLM

from trl_offline.cli import resolve_accelerate_config, split_arguments


OURS = ROOT / "trl_offline" / "accelerate_configs"


def test_accelerate_config_names_ours_then_trls_or_a_file(tmp_path):
    assert resolve_accelerate_config(["--num_processes", "2"]) == ["--num_processes", "2"]
    config_file = resolve_accelerate_config(["--accelerate_config", "zero3_cpu", "--num_processes", "2"])
    assert config_file[0] == "--config_file" and config_file[2:] == ["--num_processes", "2"]
    assert Path(config_file[1]).resolve() == (OURS / "zero3_cpu.yaml").resolve()
    for name in ("ddp", "zero2", "zero3", "ddp_cpu", "zero2_cpu"):
        assert Path(resolve_accelerate_config(["--accelerate_config", name])[1]).name == f"{name}.yaml"
    # TRL's own names still work
    assert "trl" in Path(resolve_accelerate_config(["--accelerate_config", "zero1"])[1]).parts
    mine = tmp_path / "mine.yaml"
    mine.write_text("distributed_type: NO\n")
    assert resolve_accelerate_config(["--accelerate_config", str(mine)]) == ["--config_file", str(mine)]
    with pytest.raises(ValueError, match=r"neither a file nor a config of trl-offline \(ddp, ddp_cpu, zero2,"):
        resolve_accelerate_config(["--accelerate_config", "zero9"])


def test_arguments_split_between_accelerate_and_the_script():
    argv = [
        "--config", str(ROOT / "recipes/configs/dro_tiny.yaml"),
        "--accelerate_config", "ddp_cpu", "--num_processes", "2",
        "--max_steps", "2", "--beta", "0.5",
    ]  # fmt: skip
    launch_args, script_args = split_arguments("dro", argv)
    assert launch_args[0] == "--config_file" and launch_args[2:] == ["--num_processes", "2"]
    assert script_args == [
        "--config",
        str(ROOT / "recipes/configs/dro_tiny.yaml"),
        "--max_steps",
        "2",
        "--beta",
        "0.5",
    ]


def test_trl_offline_command_launches_a_trainer_on_two_processes(tmp_path):
    # `trl-offline dro ...`: the console script's `main`, run as a file
    assert (Path(sys.executable).parent / "trl-offline").is_file()
    result = run_recipe(
        "trl_offline/cli.py", "dro",
        "--config", "recipes/configs/dro_tiny.yaml", "--accelerate_config", "ddp_cpu",
        "--max_steps", "2", "--logging_steps", "1", "--output_dir", str(tmp_path),
    )  # fmt: skip
    steps = [log for log in logged_steps(result.stdout) if "loss" in log]
    assert len(steps) == 2
    # Two processes of 16 rows: 2 steps cover 64 of the kit's 512 training rows (one process would cover 32)
    assert float(steps[-1]["epoch"]) == pytest.approx(64 / 512)
    AutoModelForCausalLM.from_pretrained(str(tmp_path))
