"""IQLearn training script: `trl-offline iqlearn`, or `recipes/iqlearn.py` (see its docstring for the commands)."""

from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config

from trl_offline import IQLearnConfig, IQLearnTrainer
from trl_offline.scripts.common import load_model_and_dataset, train_and_save


def make_parser(prog: str | None = None) -> TrlParser:
    return TrlParser((ScriptArguments, IQLearnConfig, ModelConfig), prog=prog)


def main(script_args: ScriptArguments, training_args: IQLearnConfig, model_args: ModelConfig):
    model, dataset = load_model_and_dataset(script_args, training_args, model_args)
    trainer = IQLearnTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    train_and_save(trainer, script_args, training_args)


if __name__ == "__main__":
    script_args, training_args, model_args = make_parser().parse_args_and_config(fail_with_unknown_args=False)
    main(script_args, training_args, model_args)
