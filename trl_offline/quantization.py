"""Quantized (QLoRA) models as TRL's trainers train them: how to tell one, the adapters' dtype, and a bitsandbytes
CPU pitfall."""

import torch


def is_quantized(model) -> bool:
    """Whether `model` (or the base of a PEFT model) was loaded in 4 or 8 bits; other models lack the attributes."""
    return getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)


def peft_model_kwargs(model, args) -> dict:
    """`get_peft_model`/`add_adapter` keyword arguments for a new adapter on `model`, as `KTOTrainer` chooses them."""
    if args.deepspeed_plugin is not None and args.deepspeed_plugin.zero_stage == 3 and not is_quantized(model):
        # ZeRO-3 gathers parameters into buffers of one dtype: keep the adapters in the model's rather than fp32
        return {"autocast_adapter_dtype": False}
    return {}


def keep_4bit_layers_differentiable(model) -> None:
    """Stops bitsandbytes repacking `model`'s 4-bit weights for CPU inference. On a CPU with AVX512-BF16, a `Linear4bit`
    that runs once in eval mode without gradients (a reference pass, an evaluation) switches for good to a kernel
    with no backward, after which no gradient flows through it: training would go on with zero gradients, silently.
    GPUs never take that path."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def cast_adapters_to_bf16(model) -> None:
    """The trainable (adapter) parameters of a model on a quantized base in bf16, as QLoRA trains them and TRL casts
    them; PEFT cannot be asked for it on quantized models (peft issue 2889). DoRA's magnitude vectors stay as they
    are: their updates can be too small for bf16 to represent."""
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and "lora_magnitude_vector" not in name:
            parameter.data = parameter.data.to(torch.bfloat16)
