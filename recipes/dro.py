"""Train a causal LM with DRO on responses that carry one score each, the way `trl/scripts/kto.py` trains it with KTO.

Every `DROConfig` flag works (`--beta`, `--value_network policy_head`, `--value_learning_rate`, ...), and so does a
KTO dataset as it is: `prompt` + `completion` + `label` rows (thumbs up or down), or float `reward` rows, or
preference rows (unpaired); or no score and `--reward_funcs`, each a reward model's path or hub id, or the dotted
import path of a Python function with GRPO's signature (`f(prompts, completions, **columns) -> list[float]`).
Offline, on the built-in tiny model and data:

```bash
python recipes/dro.py --config recipes/configs/dro_tiny.yaml
```

The same on 2 CPU processes under DeepSpeed ZeRO-3 (no GPU needed):

```bash
accelerate launch --config_file recipes/accelerate_configs/zero3_cpu.yaml recipes/dro.py \
    --config recipes/configs/dro_tiny.yaml
```

On GPUs, with any accelerate config (DDP, DeepSpeed ZeRO-2/3; TRL ships ready ones in `trl/accelerate_configs/`):

```bash
accelerate launch --config_file trl/accelerate_configs/zero3.yaml recipes/dro.py \
    --config recipes/configs/dro_gpu.yaml
```

The saved folder holds the policy (load it with `AutoModelForCausalLM.from_pretrained`) and the value network in
`value/`. `--model_name_or_path offline_kit:llama` and `--dataset_name offline_kit:labelled_<format>` (formats:
prompt_completion, conversational_prompt_completion) name the offline kit's tiny model and thumbs-up/down sorting
data, so the recipe runs without a hub.
"""

from trl import ModelConfig, TrlParser, get_peft_config

from trl_offline import DROConfig, DROTrainer
from trl_offline.recipe_utils import ScoredScriptArguments, load_model_and_dataset, load_reward_funcs, train_and_save


def main(script_args: ScoredScriptArguments, training_args: DROConfig, model_args: ModelConfig):
    model, dataset = load_model_and_dataset(script_args, training_args, model_args)
    trainer = DROTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        reward_funcs=load_reward_funcs(script_args),
        peft_config=get_peft_config(model_args),
    )
    train_and_save(trainer, script_args, training_args)


if __name__ == "__main__":
    parser = TrlParser((ScoredScriptArguments, DROConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config(fail_with_unknown_args=False)
    main(script_args, training_args, model_args)
