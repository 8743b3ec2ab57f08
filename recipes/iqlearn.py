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

Under DDP or DeepSpeed ZeRO-2 on 2 CPU processes: `ddp_cpu.yaml`, `zero2_cpu.yaml` in place of `zero3_cpu.yaml`.
On GPUs (bf16; set `num_processes` in the config or pass `--num_processes N`), with `ddp.yaml`, `zero2.yaml` or
`zero3.yaml`:

```bash
accelerate launch --config_file recipes/accelerate_configs/zero3.yaml recipes/iqlearn.py \
    --config recipes/configs/iqlearn_gpu.yaml
```

The same runs through the `trl-offline` command, as `trl sft|dpo|kto` run TRL's scripts:

```bash
trl-offline iqlearn --config recipes/configs/iqlearn_gpu.yaml --accelerate_config zero3
```

`--model_name_or_path offline_kit:llama` and `--dataset_name offline_kit:<format>` name the offline kit's tiny model
and synthetic data (formats: language_modeling, prompt_completion, conversational_language_modeling,
conversational_prompt_completion, conversational_multi_turn), so the recipe runs without a hub.
"""

from trl_offline.scripts.iqlearn import main, make_parser


if __name__ == "__main__":
    script_args, training_args, model_args = make_parser().parse_args_and_config(fail_with_unknown_args=False)
    main(script_args, training_args, model_args)
