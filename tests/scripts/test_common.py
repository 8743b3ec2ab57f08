from trl_offline.offline_kit import sort_reward_func
from trl_offline.scripts.common import ScoredScriptArguments, load_reward_func, load_reward_funcs


def test_reward_funcs_are_import_paths_or_model_names(tmp_path):
    assert load_reward_func("trl_offline.offline_kit.sort_reward_func") is sort_reward_func
    # Not importable: a hub id or a path, which the trainer loads as a sequence-classification model
    assert load_reward_func("Skywork/Skywork-Reward-V2-Qwen3-0.6B") == "Skywork/Skywork-Reward-V2-Qwen3-0.6B"
    folder = tmp_path / "my.reward.model"
    folder.mkdir()
    assert load_reward_func(str(folder)) == str(folder)  # a path wins over an import path that looks the same


def test_no_reward_funcs_on_the_command_line_is_none():
    assert load_reward_funcs(ScoredScriptArguments(dataset_name="d")) is None
    named = ScoredScriptArguments(dataset_name="d", reward_funcs=["trl_offline.offline_kit.sort_reward_func", "m/rm"])
    assert load_reward_funcs(named) == [sort_reward_func, "m/rm"]
