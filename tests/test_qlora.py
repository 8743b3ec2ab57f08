"""QLoRA (a bitsandbytes nf4 base + LoRA adapters) with every trainer, on the CPU: the adapters train in bf16 (as
TRL's KTO and SFT trainers leave them), the 4-bit base does not move, and DRO's value network trains on a quantized
base whichever form it takes. Also the settings of `KTOTrainer` that go with them: `quantization_config` errors,
Liger's kernels."""

import math
import warnings

import pytest
import torch
from helpers import cpu_run_args
from peft import LoraConfig
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from trl_offline import ALoLConfig, ALoLTrainer, DROConfig, DROTrainer, IQLearnConfig, IQLearnTrainer
from trl_offline.offline_kit import make_scored_dataset


def _nf4():
    # float32 compute: the CPU runs it everywhere (bf16 matmuls need AVX512-BF16 to be fast)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


def _lora():
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def _snapshot(module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def _check_qlora_step(trainer, before: dict[str, torch.Tensor], trained_prefixes=("",)) -> set[str]:
    """Trains, and checks that exactly the trainable parameters moved, that they are the adapters (and heads) in bf16
    as TRL casts them, and that the 4-bit base is untouched. Returns the names that moved."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert model.is_loaded_in_4bit
    four_bit = {name for name, p in model.named_parameters() if p.dtype == torch.uint8}
    assert four_bit, "the base is not 4-bit"
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    after = dict(model.named_parameters())
    moved = {name for name, p in after.items() if not torch.equal(before[name], p.detach())}
    trainable = {name for name, p in after.items() if p.requires_grad}
    assert moved == trainable, moved ^ trainable
    assert not moved & four_bit
    adapters = {name for name in trainable if "lora_" in name}
    assert adapters and all(after[name].dtype == torch.bfloat16 for name in adapters)
    return moved


def test_alol_and_dro_train_qlora_adapters(tmp_path, tiny_model_path):
    alol = ALoLTrainer(
        tiny_model_path,
        args=ALoLConfig(**cpu_run_args(tmp_path / "alol")),
        train_dataset=make_scored_dataset("prompt_completion", 16),
        quantization_config=_nf4(),
        peft_config=_lora(),
    )
    # The reference passes ran on the 4-bit model in eval mode before training: the layers must still backpropagate
    moved = _check_qlora_step(alol, _snapshot(alol.model))
    assert moved == {name for name in moved if ".lora_" in name and ".default." in name}

    dro = DROTrainer(
        tiny_model_path,
        args=DROConfig(**cpu_run_args(tmp_path / "dro", value_network="separate")),
        train_dataset=make_scored_dataset("prompt_completion", 16, score="label"),
        quantization_config=_nf4(),
        peft_config=_lora(),
    )
    # The value network's body is the checkpoint quantized as the policy is, with a LoRA adapter of its own
    body = dro.value_model.body
    assert body.is_loaded_in_4bit and set(body.peft_config) == {"body"}
    assert body.peft_config["body"].target_modules == {"q_proj", "v_proj"}
    moved = _check_qlora_step(dro, _snapshot(dro.model))
    value_moved = {name for name in moved if ".dro_value." in name}
    assert {name.rsplit(".", 2)[0].rsplit(".", 1)[-1] for name in value_moved} >= {"lora_A", "lora_B"}
    assert "base_model.model.dro_value.head.weight" in value_moved
    assert moved - value_moved and all(".default." in name for name in moved - value_moved)

    # Saved apart from the policy's adapter (only the value's adapter and head), and read back
    dro.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "value" / "body" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "saved" / "value" / "model.safetensors").exists()
    from safetensors.torch import load_file

    assert not any("dro_value" in key for key in load_file(str(tmp_path / "saved" / "adapter_model.safetensors")))
    trained = _snapshot(dro.value_model)
    with torch.no_grad():
        for name, p in dro.value_model.named_parameters():
            if p.requires_grad:
                p.zero_()
    dro.value_model.load_weights(str(tmp_path / "saved" / "value"))
    for name, p in dro.value_model.named_parameters():
        assert torch.equal(p, trained[name]), name


@pytest.mark.parametrize("value_network", ["adapter", "policy_head"])
def test_dro_value_network_trains_on_a_quantized_base(tmp_path, tiny_model_path, value_network):
    trainer = DROTrainer(
        tiny_model_path,
        args=DROConfig(**cpu_run_args(tmp_path, value_network=value_network)),
        train_dataset=make_scored_dataset("prompt_completion", 16, score="label"),
        quantization_config=_nf4(),
        peft_config=_lora(),
    )
    moved = _check_qlora_step(trainer, _snapshot(trainer.model))
    assert "base_model.model.dro_value.head.weight" in moved
    value_adapter = {name for name in moved if ".lora_" in name and ".value." in name}
    assert bool(value_adapter) == (value_network == "adapter")


def test_iqlearn_trains_qlora_adapters(tmp_path, tiny_model_path):
    dataset = make_scored_dataset("prompt_completion", 12, score="none")
    trainer = IQLearnTrainer(
        tiny_model_path,
        args=IQLearnConfig(**cpu_run_args(tmp_path)),
        train_dataset=dataset,
        eval_dataset=dataset,
        quantization_config=_nf4(),
        peft_config=_lora(),
    )
    before = _snapshot(trainer.model)
    # An evaluation first: on CPUs with AVX512-BF16, bitsandbytes would switch its 4-bit layers to a kernel with no
    # backward after a no-grad eval forward, and training would then move nothing
    trainer.evaluate()
    _check_qlora_step(trainer, before)


@pytest.mark.parametrize("trainer_class,config_class", [(ALoLTrainer, ALoLConfig), (DROTrainer, DROConfig)])
def test_quantization_config_errors(tmp_path, tiny_model_path, trainer_class, config_class):
    dataset = make_scored_dataset("prompt_completion", 8, score="label")
    with pytest.raises(ValueError, match="the model is already instantiated"):
        trainer_class(
            AutoModelForCausalLM.from_pretrained(tiny_model_path),
            args=config_class(**cpu_run_args(tmp_path)),
            train_dataset=dataset,
            quantization_config=_nf4(),
        )
    twice = config_class(**cpu_run_args(tmp_path, model_init_kwargs={"quantization_config": _nf4()}))
    with pytest.raises(ValueError, match="given both to the trainer and in `args.model_init_kwargs`"):
        trainer_class(tiny_model_path, args=twice, train_dataset=dataset, quantization_config=_nf4())


def test_liger_kernel_keeps_the_fused_lm_head(tmp_path, tiny_model_path):
    # liger-kernel needs a GPU (`Trainer.train` applies it); what the trainer decides before that is checked here
    dataset = make_scored_dataset("prompt_completion", 8, score="label")
    args = DROConfig(**cpu_run_args(tmp_path, use_liger_kernel=True, liger_kernel_config={"rms_norm": True}))
    with pytest.warns(FutureWarning, match="`use_liger_kernel=True` is deprecated"):
        trainer = DROTrainer(tiny_model_path, args=args, train_dataset=dataset)
    assert trainer.args.liger_kernel_config == {"rms_norm": True, "fused_linear_cross_entropy": False}

    refused = ALoLConfig(
        **cpu_run_args(tmp_path, use_liger_kernel=True, liger_kernel_config={"fused_linear_cross_entropy": True})
    )
    with warnings.catch_warnings(), pytest.raises(ValueError, match="fused_linear_cross_entropy.*not supported"):
        warnings.simplefilter("ignore", FutureWarning)
        ALoLTrainer(tiny_model_path, args=refused, train_dataset=dataset)


@pytest.fixture
def one_process_zero3_world(monkeypatch):
    """A one-process gloo world with a DeepSpeed ZeRO-3 config, undone afterwards: the process group, accelerate's
    state, transformers' global DeepSpeed config (which makes every later `from_pretrained` partition its weights)
    and the environment that `TrainingArguments(deepspeed=...)` exports."""
    import os
    import socket

    import torch.distributed as dist
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    environment = dict(os.environ)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    for key, value in {**world, "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    AcceleratorState._reset_state(reset_partial_state=True)
    yield {
        "zero_optimization": {"stage": 3},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
    }
    unset_hf_deepspeed_config()
    AcceleratorState._reset_state(reset_partial_state=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(environment)


def test_peft_under_zero3_checkpoints_reentrantly(tmp_path, tiny_model_path, one_process_zero3_world, caplog):
    # As `KTOTrainer`: PEFT + ZeRO-3 + gradient checkpointing runs reentrant (the user's False is overridden, with a
    # warning), and the inputs carry gradients into the checkpointed layers
    args = DROConfig(
        **cpu_run_args(
            tmp_path,
            deepspeed=one_process_zero3_world,
            gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": False},
            precompute_ref_log_probs=False,
            value_network="policy_head",
        )
    )
    trainer = DROTrainer(
        tiny_model_path,
        args=args,
        train_dataset=make_scored_dataset("prompt_completion", 8, score="label"),
        peft_config=_lora(),
    )
    assert trainer.is_deepspeed_enabled and args.deepspeed_plugin.zero_stage == 3
    assert trainer.args.gradient_checkpointing_kwargs == {"use_reentrant": True}
    assert "`use_reentrant=False` of `gradient_checkpointing_kwargs` is overridden" in caplog.text
    assert hasattr(trainer.model.get_base_model(), "_require_grads_hook")
