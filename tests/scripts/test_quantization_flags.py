from safetensors.torch import load_file

from trl_offline.scripts import dro


def test_dro_script_trains_qlora_with_load_in_4bit(tmp_path):
    # TRL's `ModelConfig` flags, as `trl kto --load_in_4bit --use_peft` takes them
    argv = [
        "--model_name_or_path", "offline_kit:llama",
        "--dataset_name", "offline_kit:labelled_prompt_completion",
        "--load_in_4bit", "--bnb_4bit_quant_type", "nf4", "--use_peft",
        "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "q_proj", "v_proj",
        "--max_steps", "2", "--per_device_train_batch_size", "4", "--max_length", "64",
        "--output_dir", str(tmp_path), "--use_cpu", "--bf16", "false", "--report_to", "none",
        "--save_strategy", "no", "--gradient_checkpointing", "false",
    ]  # fmt: skip
    script_args, training_args, model_args = dro.make_parser().parse_args_and_config(argv)
    dro.main(script_args, training_args, model_args)
    # On a 4-bit base the separate value network trains a LoRA adapter of its own: proof the base was quantized
    value_adapter = load_file(str(tmp_path / "value" / "body" / "adapter_model.safetensors"))
    assert value_adapter and all("lora_" in key for key in value_adapter)
    assert not (tmp_path / "value" / "model.safetensors").exists()
    policy_adapter = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert policy_adapter and all("lora_" in key and "dro_value" not in key for key in policy_adapter)
