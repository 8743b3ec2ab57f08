"""Train a causal LM with A-LoL on responses that carry a score, the way `trl/scripts/kto.py` trains it with KTO.

Every `ALoLConfig` flag works (`--loss_type alol_seq`, `--clip_epsilon`, `--priority_sampling`, ...). The dataset has
`prompt` + `completion` + `reward` rows, KTO `label` rows or preference rows; or no score and `--reward_funcs`, each a
reward model's path or hub id, or the dotted import path of a Python function with GRPO's signature
(`f(prompts, completions, **columns) -> list[float]`). Offline, on the built-in tiny model and data:

```bash
python recipes/alol.py --config recipes/configs/alol_tiny.yaml
```

The same on 2 CPU processes under DeepSpeed ZeRO-3 (no GPU needed):

```bash
accelerate launch --config_file recipes/accelerate_configs/zero3_cpu.yaml recipes/alol.py \
    --config recipes/configs/alol_tiny.yaml
```

On GPUs, with any accelerate config (DDP, DeepSpeed ZeRO-2/3; TRL ships ready ones in `trl/accelerate_configs/`):

```bash
accelerate launch --config_file trl/accelerate_configs/zero3.yaml recipes/alol.py \
    --config recipes/configs/alol_gpu.yaml
```

`--model_name_or_path offline_kit:llama` and `--dataset_name offline_kit:scored_<format>` (formats:
prompt_completion, conversational_prompt_completion) name the offline kit's tiny model and scored sorting data, and
`--reward_funcs trl_offline.offline_kit.sort_reward_func` its reward (with `offline_kit:labelled_<format>`, whose
labels the reward function then replaces), so the recipe runs without a hub.
"""

from trl import ModelConfig, TrlParser, get_peft_config

from trl_offline import ALoLConfig, ALoLTrainer
from trl_offline.recipe_utils import ScoredScriptArguments, load_model_and_dataset, load_reward_funcs, train_and_save


def main(script_args: ScoredScriptArguments, training_args: ALoLConfig, model_args: ModelConfig):
    model, dataset = load_model_and_dataset(script_args, training_args, model_args)
    trainer = ALoLTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        reward_funcs=load_reward_funcs(script_args),
        peft_config=get_peft_config(model_args),
    )
    train_and_save(trainer, script_args, training_args)


if __name__ == "__main__":
    parser = TrlParser((ScoredScriptArguments, ALoLConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config(fail_with_unknown_args=False)
    main(script_args, training_args, model_args)
