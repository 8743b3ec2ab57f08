"""Each trainer trains a few steps on the device under test in bf16 mixed precision (`bf16=True`, as users run it),
from a warm start, with the shipped defaults but for sizes, steps and device; then saves a model that
`AutoModelForCausalLM.from_pretrained` reloads with exactly the trained weights."""

import math

import pytest
import torch
from device_runs import linear_output_dtypes, shipped_run_args
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from trl_offline import ALoLConfig, ALoLTrainer, DROConfig, DROTrainer, IQLearnConfig, IQLearnTrainer
from trl_offline.dro.value_networks import PromptEndValueHead, PromptValueModel
from trl_offline.offline_kit import make_dataset, make_scored_dataset


pytestmark = pytest.mark.gpu

NUM_ROWS = 16


def _copies(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def train_in_bf16(trainer, device: torch.device, frozen: dict[str, torch.nn.Module]) -> None:
    """Trains, and checks that the layers computed in bf16, that every logged loss is finite, that every trainable
    parameter moved and stayed on `device`, and that the `frozen` modules did not move."""
    assert trainer.args.bf16 and trainer.args.device.type == device.type
    before = _copies(trainer.model)
    frozen_before = {name: _copies(module) for name, module in frozen.items()}
    with linear_output_dtypes(trainer.model) as dtypes:
        trainer.train()
    assert dtypes == {torch.bfloat16}, dtypes  # float32 weights, bf16 matmuls: mixed precision

    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses), losses
    for name, parameter in trainer.model.named_parameters():
        assert parameter.device.type == device.type, name
        assert parameter.dtype == torch.float32, name
        assert not torch.equal(parameter, before[name]), f"{name} did not change"
    for module_name, module in frozen.items():
        for name, parameter in module.named_parameters():
            assert parameter.device.type == device.type, f"{module_name}.{name}"
            assert torch.equal(parameter, frozen_before[module_name][name]), f"{module_name}.{name} changed"


def save_and_reload(trainer, folder, beside: tuple[str, ...]) -> None:
    """`save_model` writes a plain causal LM whose weights are the trained ones, bit for bit; the trainer's extra
    modules (names starting with `beside`) are not in it."""
    trainer.save_model(str(folder))
    reloaded = AutoModelForCausalLM.from_pretrained(str(folder)).state_dict()
    trained = {k: v for k, v in trainer.model.state_dict().items() if not k.startswith(beside)}
    assert reloaded.keys() == trained.keys()
    for name, weight in reloaded.items():
        assert weight.dtype == trained[name].dtype, name
        assert torch.equal(weight, trained[name].cpu()), name


def assert_same_state(module: torch.nn.Module, expected: torch.nn.Module) -> None:
    state, expected_state = module.state_dict(), expected.state_dict()
    assert state.keys() == expected_state.keys()
    for name, tensor in state.items():
        assert torch.equal(tensor.cpu(), expected_state[name].cpu()), name


def test_iqlearn_trains_in_bf16_and_saves(device, tmp_path, warm_start_model_path):
    args = IQLearnConfig(**shipped_run_args(device, tmp_path / "run", bf16=True))
    dataset = make_dataset("prompt_completion", NUM_ROWS)
    trainer = IQLearnTrainer(warm_start_model_path, args=args, train_dataset=dataset)
    train_in_bf16(trainer, device, frozen={})  # the learned soft value is a submodule: it must train too
    assert trainer.soft_value_head.linear.weight.abs().sum() > 0

    save_and_reload(trainer, tmp_path / "saved", beside=("soft_value_head.",))
    head = load_file(str(tmp_path / "saved" / "soft_value_head.safetensors"))
    for name, weight in trainer.soft_value_head.state_dict().items():
        assert torch.equal(head[name], weight.cpu()), name


def test_alol_trains_in_bf16_and_saves(device, tmp_path, warm_start_model_path):
    args = ALoLConfig(**shipped_run_args(device, tmp_path / "run", bf16=True))
    dataset = make_scored_dataset("prompt_completion", NUM_ROWS)
    trainer = ALoLTrainer(warm_start_model_path, args=args, train_dataset=dataset)
    # The value head is fit once, before training, and only decides the rows: training must leave it alone
    train_in_bf16(trainer, device, frozen={"value_head": trainer.value_head})
    save_and_reload(trainer, tmp_path / "saved", beside=())


@pytest.mark.parametrize("value_network", ["separate", "policy_head"])
def test_dro_trains_in_bf16_and_saves(device, tmp_path, warm_start_model_path, value_network):
    ref_model = AutoModelForCausalLM.from_pretrained(warm_start_model_path)
    args = DROConfig(**shipped_run_args(device, tmp_path / "run", bf16=True, value_network=value_network))
    dataset = make_scored_dataset("prompt_completion", NUM_ROWS, score="label")
    trainer = DROTrainer(warm_start_model_path, ref_model=ref_model, args=args, train_dataset=dataset)
    value = trainer.value_model
    assert isinstance(value, PromptValueModel if value_network == "separate" else PromptEndValueHead)
    # The value network rides on the policy (`dro_value.`), so it is among the parameters that must move
    train_in_bf16(trainer, device, frozen={"ref_model": ref_model})

    save_and_reload(trainer, tmp_path / "saved", beside=("dro_value.",))
    folder = str(tmp_path / "saved" / "value")
    if value_network == "separate":
        reloaded_value = PromptValueModel.from_pretrained(folder)
    else:
        reloaded_value = PromptEndValueHead(value.head.in_features)
        reloaded_value.load_weights(folder)
    assert_same_state(reloaded_value, value)
