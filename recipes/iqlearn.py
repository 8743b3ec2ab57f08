"""Train a causal LM on demonstrations with IQLearn, the way `trl/scripts/sft.py` trains it with SFT.

Every `SFTConfig` flag works, plus `--td_coef` and `--gamma`. Offline, on the built-in tiny model and data:

```bash
python recipes/iqlearn.py --config recipes/configs/iqlearn_tiny.yaml
```

The same on 2 CPU processes under DeepSpeed ZeRO-3 (no GPU needed):

```bash
accelerate launch --config_file recipes/accelerate_configs/zero3_cpu.yaml recipes/iqlearn.py \
    --config recipes/configs/iqlearn_tiny.yaml
```

On GPUs, with any accelerate config (DDP, DeepSpeed ZeRO-2/3; TRL ships ready ones in `trl/accelerate_configs/`):

```bash
accelerate launch --config_file trl/accelerate_configs/zero3.yaml recipes/iqlearn.py \
    --config recipes/configs/iqlearn_gpu.yaml
```

`--model_name_or_path offline_kit:llama` and `--dataset_name offline_kit:<format>` name the offline kit's tiny model
and synthetic data (formats: language_modeling, prompt_completion, conversational_language_modeling,
conversational_prompt_completion, conversational_multi_turn), so the recipe runs without a hub.
"""

from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config

from trl_offline import IQLearnConfig, IQLearnTrainer
from trl_offline.recipe_utils import load_model_and_dataset, train_and_save


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
    parser = TrlParser((ScriptArguments, IQLearnConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config(fail_with_unknown_args=False)
    main(script_args, training_args, model_args)
