"""Builds an `ALoLTrainer` and a `DROTrainer` on datasets whose lengths are not multiples of the process count, and
writes what their precompute gave every row (rewards from `reward_funcs`, a function for A-LoL and a reward model for
DRO; reference log-probabilities, values,
advantages, the rows A-LoL keeps) to a JSON file from the main process. Run with `python` (one process) or under
`accelerate launch`; `test_precompute.py` compares the files.

    python tests/distributed/dump_precompute.py MODEL_PATH REWARD_MODEL_PATH OUTPUT_JSON
"""

import json
import sys
import tempfile

from trl_offline import ALoLConfig, ALoLTrainer, DROConfig, DROTrainer
from trl_offline.offline_kit import make_scored_dataset, sort_reward_func


NUM_TRAIN_ROWS, NUM_EVAL_ROWS = 31, 11  # 31 = 3 * 10 + 1 = 4 * 7 + 3 = 2 * 15 + 1


def _args(config_class, output_dir: str, **overrides):
    return config_class(
        output_dir=output_dir,
        use_cpu=True,
        bf16=False,
        report_to="none",
        gradient_checkpointing=False,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=3,
        disable_tqdm=True,
        seed=0,
        **overrides,
    )


def alol_rows(model_path: str, output_dir: str) -> dict:
    args = _args(
        ALoLConfig,
        output_dir,
        loss_type="alol_seq",  # keeps the per-token reference log-probabilities too
        value_num_prompts=13,
        value_num_epochs=3,
        value_batch_size=4,
        max_completion_length=5,
    )
    trainer = ALoLTrainer(
        model_path,
        args=args,
        train_dataset=make_scored_dataset("prompt_completion", NUM_TRAIN_ROWS, score="none"),
        eval_dataset=make_scored_dataset("prompt_completion", NUM_EVAL_ROWS, seed=1, score="none"),
        reward_funcs=sort_reward_func,  # the value targets come from the reference's greedy answers
    )
    scored, evaluation = trainer._scored_train, trainer.eval_dataset
    columns = ("prompt_ids", "reward", "ref_logp", "ref_logps", "value", "advantage")
    return {
        "train": {column: list(scored[column]) for column in columns},
        "eval": {column: list(evaluation[column]) for column in columns},
        "positive_rows": trainer._positive_rows,
        "value_metrics": {k: v for k, v in trainer.precompute_metrics.items() if k.startswith("value/")},
    }


def dro_rows(model_path: str, reward_model_path: str, output_dir: str) -> dict:
    trainer = DROTrainer(
        model_path,
        args=_args(DROConfig, output_dir),
        train_dataset=make_scored_dataset("prompt_completion", NUM_TRAIN_ROWS, score="none"),
        eval_dataset=make_scored_dataset("prompt_completion", NUM_EVAL_ROWS, seed=1, score="none"),
        reward_funcs=reward_model_path,  # a sequence classifier scores every row, each process its share
    )
    train, evaluation = trainer._unnormalized
    return {
        "train": {column: list(train[column]) for column in ("prompt_ids", "reward", "ref_logp")},
        "eval": {column: list(evaluation[column]) for column in ("prompt_ids", "reward", "ref_logp")},
        "reward_statistics": [trainer.reward_shift, trainer.reward_scale],
    }


if __name__ == "__main__":
    model_path, reward_model_path, output_json = sys.argv[1:4]
    with tempfile.TemporaryDirectory() as output_dir:
        result = {
            "alol": alol_rows(model_path, output_dir),
            "dro": dro_rows(model_path, reward_model_path, output_dir),
        }
    from accelerate import PartialState

    state = PartialState()
    result["num_processes"] = state.num_processes
    if state.is_main_process:
        with open(output_json, "w") as f:
            json.dump(result, f)
    state.wait_for_everyone()
    if state.num_processes > 1:
        state.destroy_process_group()
