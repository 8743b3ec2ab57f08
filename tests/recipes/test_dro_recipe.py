from launch_utils import run_recipe
from transformers import AutoModelForCausalLM

from trl_offline.dro.value_networks import PromptValueModel


def test_dro_recipe_runs_offline_with_its_tiny_config(tmp_path):
    # The command printed in the recipe's docstring, shortened to a few steps
    run_recipe(
        "dro.py", "--config", "recipes/configs/dro_tiny.yaml", "--max_steps", "3", "--output_dir", str(tmp_path)
    )
    AutoModelForCausalLM.from_pretrained(str(tmp_path))
    PromptValueModel.from_pretrained(str(tmp_path / "value"))
    card = (tmp_path / "README.md").read_text()
    assert "DRO" in card and "2405.19107" in card
