"""A-LoL training script: `trl-offline alol`, or `recipes/alol.py` (see its docstring for the commands)."""

from trl import ModelConfig, TrlParser, get_peft_config, get_quantization_config

from trl_offline import ALoLConfig, ALoLTrainer
from trl_offline.scripts.common import (
    ScoredScriptArguments,
    load_model_and_dataset,
    load_reward_funcs,
    train_and_save,
)


def make_parser(prog: str | None = None) -> TrlParser:
    return TrlParser((ScoredScriptArguments, ALoLConfig, ModelConfig), prog=prog)


def main(script_args: ScoredScriptArguments, training_args: ALoLConfig, model_args: ModelConfig):
    model, dataset = load_model_and_dataset(script_args, training_args, model_args)
    trainer = ALoLTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        reward_funcs=load_reward_funcs(script_args),
        quantization_config=get_quantization_config(model_args),  # --load_in_4bit / --load_in_8bit, as TRL's scripts
        peft_config=get_peft_config(model_args),
    )
    train_and_save(trainer, script_args, training_args)


if __name__ == "__main__":
    script_args, training_args, model_args = make_parser().parse_args_and_config(fail_with_unknown_args=False)
    main(script_args, training_args, model_args)
