"""What the training scripts share: reading the model and dataset a TRL script reads (with the offline kit's names for
runs without a hub), reward functions named on the command line, and the end of a run (train, save, push, end)."""

import importlib
import os
from dataclasses import dataclass, field

from accelerate import PartialState
from datasets import load_dataset
from trl import ScriptArguments

from ..offline_kit import is_kit_name, load_kit_dataset, resolve_kit_model


@dataclass
class ScoredScriptArguments(ScriptArguments):
    """TRL's script arguments, plus the reward functions of the trainers that learn from scored responses."""

    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Reward functions: paths or hub ids of sequence-classification models, or dotted import paths "
            "of functions with GRPO's signature, e.g. 'my_package.rewards.helpfulness'. Weighted by `reward_weights`."
        },
    )


def load_model_and_dataset(script_args, training_args, model_args):
    """The model (a path or hub id, or `offline_kit:<architecture>` built on the spot) and the `DatasetDict`, with
    `training_args.model_init_kwargs` filled from `model_args` as TRL's scripts do."""
    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = model_init_kwargs

    model = model_args.model_name_or_path
    if is_kit_name(model):
        with PartialState().main_process_first():
            model = resolve_kit_model(model, training_args.output_dir)
    if is_kit_name(script_args.dataset_name):
        dataset = load_kit_dataset(script_args.dataset_name)
    else:
        dataset = load_dataset(
            script_args.dataset_name, name=script_args.dataset_config, streaming=script_args.dataset_streaming
        )
    return model, dataset


def load_reward_funcs(script_args: ScoredScriptArguments) -> list | None:
    """The `--reward_funcs` of the command line, each a function or a model path or hub id; `None` without any."""
    return [load_reward_func(name) for name in script_args.reward_funcs or []] or None


def load_reward_func(name: str):
    """A dotted import path names a function; anything else is a model path or hub id, loaded by the trainer."""
    module_name, _, attribute = name.rpartition(".")
    if module_name and not os.path.exists(name):
        try:
            return getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError):
            pass
    return name


def train_and_save(trainer, script_args, training_args) -> None:
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.accelerator.print("Training completed.")
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    # Every rank done (rank 0 writes the files after the others have given their shards) before the process group
    # goes; then finish the trackers and destroy it, so no rank aborts at exit
    trainer.accelerator.wait_for_everyone()
    trainer.end()
