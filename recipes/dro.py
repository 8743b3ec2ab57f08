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

Under DDP or DeepSpeed ZeRO-2 on 2 CPU processes: `ddp_cpu.yaml`, `zero2_cpu.yaml` in place of `zero3_cpu.yaml`.
On GPUs (bf16; set `num_processes` in the config or pass `--num_processes N`), with `ddp.yaml`, `zero2.yaml` or
`zero3.yaml`:

```bash
accelerate launch --config_file recipes/accelerate_configs/zero3.yaml recipes/dro.py \
    --config recipes/configs/dro_gpu.yaml
```

The same runs through the `trl-offline` command, as `trl sft|dpo|kto` run TRL's scripts:

```bash
trl-offline dro --config recipes/configs/dro_gpu.yaml --accelerate_config zero3
```

The saved folder holds the policy (load it with `AutoModelForCausalLM.from_pretrained`) and the value network in
`value/`. `--model_name_or_path offline_kit:llama` and `--dataset_name offline_kit:labelled_<format>` (formats:
prompt_completion, conversational_prompt_completion) name the offline kit's tiny model and thumbs-up/down sorting
data, so the recipe runs without a hub.
"""

from trl_offline.scripts.dro import main, make_parser


if __name__ == "__main__":
    script_args, training_args, model_args = make_parser().parse_args_and_config(fail_with_unknown_args=False)
    main(script_args, training_args, model_args)
