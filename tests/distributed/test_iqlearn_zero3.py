import torch
from launch_utils import run_recipe
from transformers import AutoModelForCausalLM


def test_iqlearn_recipe_trains_under_zero3_on_two_processes(tmp_path):
    # Guards the parts that only ZeRO-3 exercises: the LM-head weight is sharded, so the soft-Q op must gather it in
    # forward and again in its recomputing backward, and the kit model must build on one rank without collectives.
    run_recipe(
        "iqlearn.py",
        "--config", "recipes/configs/iqlearn_tiny.yaml",
        "--output_dir", str(tmp_path),
        "--max_steps", "4",
        accelerate_config="zero3_cpu.yaml",
    )  # fmt: skip

    # The saved policy is the full model (16-bit gather on save), and the LM head, whose gradient only the
    # chunked op's backward produces, was trained
    trained = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    initial = AutoModelForCausalLM.from_pretrained(str(tmp_path / "offline-kit-llama"))
    assert trained.lm_head.weight.shape == initial.lm_head.weight.shape
    assert not torch.equal(trained.lm_head.weight, initial.lm_head.weight)
    assert not torch.equal(trained.model.embed_tokens.weight, initial.model.embed_tokens.weight)
