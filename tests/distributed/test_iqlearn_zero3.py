import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


ROOT = Path(__file__).resolve().parents[2]


def test_iqlearn_recipe_trains_under_zero3_on_two_processes(tmp_path):
    # Guards the parts that only ZeRO-3 exercises: the LM-head weight is sharded, so the soft-Q op must gather it in
    # forward and again in its recomputing backward, and the kit model must build on one rank without collectives.
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        # The DeepSpeed CPU op compiles once (~1 min) and is reused from this cache
        "TORCH_EXTENSIONS_DIR": os.environ.get(
            "TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/trl_offline/torch_extensions")
        ),
    }
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", "recipes/accelerate_configs/zero3_cpu.yaml",
        "recipes/iqlearn.py",
        "--config", "recipes/configs/iqlearn_tiny.yaml",
        "--output_dir", str(tmp_path),
        "--max_steps", "4",
        "--disable_tqdm", "true",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Training completed." in result.stdout

    # The saved policy is the full model (16-bit gather on save), and the LM head, whose gradient only the
    # chunked op's backward produces, was trained
    trained = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    initial = AutoModelForCausalLM.from_pretrained(str(tmp_path / "offline-kit-llama"))
    assert trained.lm_head.weight.shape == initial.lm_head.weight.shape
    assert not torch.equal(trained.lm_head.weight, initial.lm_head.weight)
    assert not torch.equal(trained.model.embed_tokens.weight, initial.model.embed_tokens.weight)
