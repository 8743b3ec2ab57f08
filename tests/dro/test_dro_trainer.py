import copy
import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from datasets import Dataset, load_dataset
from helpers import cpu_run_args, first_batch
from peft import LoraConfig
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainingArguments
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging
from trl import KTOConfig

from trl_offline import DROConfig, DROTrainer
from trl_offline._trl_compat import active_adapter_layers
from trl_offline.dro.value_networks import PromptEndValueHead, PromptValueModel
from trl_offline.offline_kit import build_tiny_model, make_scored_dataset, sort_reward_func


def _config(tmp_path, **overrides) -> DROConfig:
    return DROConfig(**cpu_run_args(tmp_path, **overrides))


def _labelled(num_rows=16, dataset_format="prompt_completion", seed=0):
    return make_scored_dataset(dataset_format, num_rows, seed=seed, score="label")


def naive_sequence_logps(model, batch) -> torch.Tensor:
    """`log pi(y|x)` `(B,)` from the full logits of a plain forward; differentiable."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    logps = logits.log_softmax(-1).gather(-1, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
    return (logps * batch["completion_mask"][:, 1:]).sum(-1)


def naive_values(value_model: PromptValueModel, batch) -> torch.Tensor:
    """`V(x)` `(B,)` from a forward of each prompt alone through the value body; differentiable."""
    values = []
    for ids, completion in zip(batch["input_ids"], batch["completion_mask"]):
        prompt = ids[: int(completion.argmax())].unsqueeze(0)  # the prefix before the completion
        hidden = value_model.body(input_ids=prompt).last_hidden_state[0, -1]  # (H,)
        values.append(value_model.head(hidden).squeeze(-1))
    return torch.stack(values)


LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def _forward_kwargs(batch) -> dict[str, torch.Tensor]:
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    return dict(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels, fused_lm_head=True
    )


def _parameters(module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


# -- training ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value_network", ["separate", "policy_head"])
def test_training_changes_policy_and_value_but_never_the_reference(tmp_path, tiny_model_path, value_network):
    ref_model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    reference = _parameters(ref_model)
    trainer = DROTrainer(
        tiny_model_path,
        ref_model=ref_model,
        args=_config(tmp_path, value_network=value_network),
        train_dataset=_labelled(),
    )
    value = trainer.value_model
    assert isinstance(value, PromptValueModel if value_network == "separate" else PromptEndValueHead)
    policy_before = {n: p for n, p in _parameters(trainer.model).items() if not n.startswith("dro_value.")}
    value_before = _parameters(value)
    trainer.train()

    policy_after = {n: p for n, p in trainer.model.named_parameters() if not n.startswith("dro_value.")}
    unchanged = [n for n, p in policy_after.items() if torch.equal(p, policy_before[n])]
    assert not unchanged, unchanged
    value_unchanged = [n for n, p in value.named_parameters() if torch.equal(p, value_before[n])]
    assert not value_unchanged, value_unchanged
    for name, param in ref_model.named_parameters():
        assert torch.equal(param, reference[name]), name

    logged = [log for log in trainer.state.log_history if "loss/value" in log]
    assert len(logged) == 3
    for key in ("loss/policy", "residual/mean", "residual/abs", "log_ratio/mean", "value/mean", "reward/mean"):
        assert key in logged[0], key
    # Step 1 starts at the reference with a zero value head: log-ratio 0, V = 0, rho = r, policy loss 0
    assert logged[0]["log_ratio/mean"] == pytest.approx(0.0, abs=1e-5)
    assert logged[0]["value/mean"] == 0.0 and logged[0]["loss/policy"] == pytest.approx(0.0, abs=1e-5)
    assert logged[0]["residual/mean"] == pytest.approx(logged[0]["reward/mean"], abs=1e-5)


@pytest.mark.parametrize("share_up", [0.05, 0.25, 0.5])
def test_rewards_are_scaled_to_a_range_of_one_whatever_the_share_of_thumbs_up(tmp_path, tiny_model_path, share_up):
    # 20 rows: 1, 5 or 10 thumbs up. Centred on the mean p and divided by the range 1: up 1 - p, down -p
    num_up = round(20 * share_up)
    dataset = Dataset.from_list(
        [{"prompt": "ab=", "completion": "ab" if i < num_up else "ba", "label": i < num_up} for i in range(20)]
    )
    trainer = DROTrainer(tiny_model_path, args=_config(tmp_path), train_dataset=dataset)
    expected = [1 - share_up] * num_up + [-share_up] * (20 - num_up)
    assert trainer.train_dataset["reward"] == pytest.approx(expected)
    assert trainer.args.beta == 0.1  # the default on this scale: 1 / 0.1 = 10 nats between thumbs up and down
    metrics = trainer.precompute_metrics
    assert metrics["reward/raw_mean"] == pytest.approx(share_up) and metrics["reward/raw_range"] == 1.0
    assert metrics["beta/optimum_log_odds"] == pytest.approx(10.0)


def test_std_scaling_is_the_papers_setting_and_none_keeps_the_rewards(tmp_path, tiny_model_path):
    dataset = _labelled(16)
    labels = torch.tensor(dataset["label"], dtype=torch.float64)  # True -> 1.0, False -> 0.0, then standardised
    paper = DROTrainer(tiny_model_path, args=_config(tmp_path, reward_scaling="std"), train_dataset=dataset)
    rewards = torch.tensor(paper.train_dataset["reward"], dtype=torch.float64)
    torch.testing.assert_close(rewards, (labels - labels.mean()) / labels.std(unbiased=False))
    assert paper.args.beta == 1.0  # the paper's tau, with the one flag
    std = labels.std(unbiased=False).item()
    assert paper.precompute_metrics["beta/optimum_log_odds"] == pytest.approx(1.0 / std / 1.0)

    raw = DROTrainer(tiny_model_path, args=_config(tmp_path, reward_scaling="none"), train_dataset=dataset)
    assert raw.train_dataset["reward"] == [float(label) for label in dataset["label"]]


def test_the_start_says_how_far_beta_moves_the_policy_and_warns_out_of_bounds(tmp_path, tiny_model_path):
    # Labels scaled to a range of 1: the optimum shifts the log-odds of thumbs up against down by 1 / beta nats
    dataset = _labelled(16)
    for beta, warning in ((0.1, None), (2.0, "barely differs from the reference"), (0.05, "can run away")):
        with CaptureLogger(logging.get_logger("trl_offline.dro.trainer")) as log:
            trainer = DROTrainer(tiny_model_path, args=_config(tmp_path, beta=beta), train_dataset=dataset)
        assert trainer.precompute_metrics["beta/optimum_log_odds"] == pytest.approx(1 / beta)
        if warning is None:  # logged at info level, under the default verbosity
            assert "shifts the log-odds" not in log.out
        else:
            assert f"up to {1 / beta:g} nats" in log.out and warning in log.out, log.out


def test_eval_rewards_are_scaled_with_the_training_statistics(tmp_path, tiny_model_path):
    train, evaluation = _labelled(16), _labelled(8, seed=5)
    trainer = DROTrainer(tiny_model_path, args=_config(tmp_path), train_dataset=train, eval_dataset=evaluation)
    mean = torch.tensor(train["label"], dtype=torch.float64).mean().item()
    expected = [(float(label) - mean) / 1.0 for label in evaluation["label"]]  # the training labels' range is 1
    assert trainer.eval_dataset["reward"] == pytest.approx(expected)


def test_loss_at_initialisation_is_half_the_mean_squared_reward(tmp_path, tiny_model_path):
    # pi == pi_ref and V == 0 (zero head): rho = r, and the precomputed ref_logp is the policy's own log-probability
    trainer = DROTrainer(tiny_model_path, args=_config(tmp_path), train_dataset=_labelled())
    batch = first_batch(trainer)
    with torch.no_grad():
        torch.testing.assert_close(batch["ref_logp"], naive_sequence_logps(trainer.model, batch), rtol=0, atol=1e-4)
        loss = trainer.compute_loss(trainer.model, batch)
    assert loss.item() == pytest.approx(0.5 * batch["reward"].square().mean().item(), rel=1e-5)


@pytest.mark.parametrize("rescale_policy_grad", [True, False])
def test_gradients_match_the_papers_two_objectives_after_training_moved_both(
    tmp_path, tiny_model_path, rescale_policy_grad
):
    # Two steps move the policy off the reference and the value head off zero; then every gradient of one batch must
    # be the value's gradient of 1/2 rho^2 (policy frozen) and the policy's (V frozen, divided by beta if rescaled),
    # from a naive computation with full logits and a forward of each prompt alone
    beta = 0.5
    trainer = DROTrainer(
        tiny_model_path,
        args=_config(tmp_path, beta=beta, rescale_policy_grad=rescale_policy_grad, max_steps=2),
        train_dataset=_labelled(),
    )
    trainer.train()
    model, value = trainer.model, trainer.value_model
    batch = first_batch(trainer)
    model.zero_grad()
    trainer.compute_loss(model, batch).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    logps, values = naive_sequence_logps(model, batch), naive_values(value, batch)
    log_ratio, rewards = logps - batch["ref_logp"], batch["reward"]
    value_objective = 0.5 * (rewards - values - beta * log_ratio.detach()) ** 2
    policy_objective = 0.5 * (rewards - values.detach() - beta * log_ratio) ** 2 / (beta if rescale_policy_grad else 1)
    (value_objective.mean() + policy_objective.mean()).backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    assert got.keys() == expected.keys()
    assert any(n.startswith("dro_value.body.") and expected[n].abs().sum() > 0 for n in expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-3, atol=1e-6, msg=name)


def test_live_reference_gives_the_precomputed_loss(tmp_path, tiny_model_path):
    # Plain SGD: AdamW would blow the last-bit differences of batched reference passes up to visible ones
    dataset, common = _labelled(), dict(optim="sgd", learning_rate=0.1)
    precomputed = DROTrainer(tiny_model_path, args=_config(tmp_path / "a", **common), train_dataset=dataset)
    live = DROTrainer(
        tiny_model_path, args=_config(tmp_path / "b", precompute_ref_log_probs=False, **common), train_dataset=dataset
    )
    assert live.ref_model is not None and "ref_logp" not in live.train_dataset.column_names
    precomputed.train()
    live.train()
    precomputed_losses = [log["loss"] for log in precomputed.state.log_history if "loss" in log]
    live_losses = [log["loss"] for log in live.state.log_history if "loss" in log]
    assert len(live_losses) == 3
    assert live_losses == pytest.approx(precomputed_losses, rel=1e-4)


def test_gradient_accumulation_gives_the_update_of_the_larger_batch(tmp_path, tiny_model_path):
    # The loss is a mean over sequences; with plain SGD two accumulated half batches move policy and value as one
    dataset = _labelled()
    common = dict(max_steps=2, optim="sgd", learning_rate=0.1)
    one_batch = DROTrainer(
        tiny_model_path, args=_config(tmp_path / "a", per_device_train_batch_size=4, **common), train_dataset=dataset
    )
    accumulated = DROTrainer(
        tiny_model_path,
        args=_config(tmp_path / "b", per_device_train_batch_size=2, gradient_accumulation_steps=2, **common),
        train_dataset=dataset,
    )
    one_batch.train()
    accumulated.train()
    for (name, p), q in zip(one_batch.model.named_parameters(), accumulated.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


def test_value_network_has_its_own_learning_rate_in_the_optimizer(tmp_path, tiny_model_path):
    trainer = DROTrainer(
        tiny_model_path,
        args=_config(tmp_path, learning_rate=1e-3, value_learning_rate=5e-2, weight_decay=0.1, max_steps=4),
        train_dataset=_labelled(),
    )
    trainer.create_optimizer_and_scheduler(num_training_steps=4)
    value_ids = {id(p) for p in trainer.value_model.parameters()}
    groups = trainer.optimizer.param_groups
    value_groups = [g for g in groups if any(id(p) in value_ids for p in g["params"])]
    assert value_groups and all(g["lr"] == 5e-2 or g.get("initial_lr") == 5e-2 for g in value_groups)
    assert all(id(p) in value_ids for g in value_groups for p in g["params"])
    assert {g["weight_decay"] for g in value_groups} == {0.0, 0.1}  # biases and weights, as for the policy
    assert sum(len(g["params"]) for g in value_groups) == len(value_ids)
    policy_groups = [g for g in groups if all(g is not v for v in value_groups)]
    assert {g.get("initial_lr", g["lr"]) for g in policy_groups} == {1e-3}
    # The scheduler scales every group: the value's learning rate follows the same schedule
    trainer.lr_scheduler.step()
    trainer.lr_scheduler.step()
    ratios = {round(g["lr"] / g["initial_lr"], 6) for g in groups}
    assert len(ratios) == 1


# -- data ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset_format", ["prompt_completion", "conversational_prompt_completion"])
def test_a_kto_dataset_and_config_run_unchanged(tmp_path, tiny_model_path, dataset_format):
    # What a KTOTrainer user has: prompt / completion / label rows and a KTOConfig. The config's training fields carry
    # over; KTO's own fields, left at KTO's defaults, give way to DRO's (setting one is an error:
    # tests/test_trl_arguments.py)
    kto_args = KTOConfig(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=2, per_device_train_batch_size=4
    )
    trainer = DROTrainer(tiny_model_path, args=kto_args, train_dataset=_labelled(dataset_format=dataset_format))
    assert isinstance(trainer.args, DROConfig) and trainer.args.max_steps == 2
    assert trainer.args.reward_scaling == "range" and trainer.args.precompute_ref_log_probs  # DRO's defaults

    trainer.train()
    assert trainer.state.global_step == 2


def test_preference_rows_are_unpaired(tmp_path, tiny_model_path):
    rows = [{"prompt": "ba=", "chosen": "ab", "rejected": "ba"}, {"prompt": "dc=", "chosen": "cd", "rejected": "dc"}]
    trainer = DROTrainer(
        tiny_model_path, args=_config(tmp_path, reward_scaling="none"), train_dataset=Dataset.from_list(rows)
    )
    assert sorted(trainer.train_dataset["reward"]) == [0.0, 0.0, 1.0, 1.0]


def test_plain_training_arguments_are_converted(tmp_path, tiny_model_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=1)
    trainer = DROTrainer(tiny_model_path, args=args, train_dataset=_labelled())
    assert isinstance(trainer.args, DROConfig) and trainer.args.max_steps == 1


@pytest.mark.parametrize(
    "rows,message",
    [
        ([{"prompt": "ab=", "label": True}], r"missing \['completion'\]"),
        ([{"prompt": "ab=", "completion": "ab"}], "no 'reward' or 'label' column"),
        (
            [
                {"prompt": "ab=", "completion": "ab", "reward": 1.0},
                {"prompt": "ba=", "completion": "ab", "reward": None},
            ],
            "Row 1 of column 'reward'",
        ),
        (
            [
                {"prompt": "ab=", "completion": "ab", "reward": 1.0},
                {"prompt": "b=", "completion": "b", "reward": float("nan")},
            ],
            r"Row 1 of column 'reward' is not finite \(nan\)",
        ),
        (
            [
                {"prompt": "ab=", "completion": "ab", "label": True},
                {"prompt": "ba=", "completion": "", "label": False},
            ],
            "Row 1 of column 'completion' is an empty string",
        ),
        (
            [
                {"prompt": "abcdefgh=", "completion": "ab", "label": True},
                {"prompt": "abcdefg=", "completion": "a", "label": False},
            ],
            r"Every row of the train dataset \(2\) has a prompt of `max_length=6` tokens or more",
        ),
    ],
)
def test_bad_datasets_are_refused(tmp_path, tiny_model_path, rows, message):
    with pytest.raises((ValueError, TypeError), match=message):
        DROTrainer(tiny_model_path, args=_config(tmp_path, max_length=6), train_dataset=Dataset.from_list(rows))


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"beta": 0.0}, "`beta` must be > 0"),
        ({"beta": -1.0}, "`beta` must be > 0"),
        ({"value_network": "shared"}, "`value_network` must be one of"),
        ({"value_learning_rate": 0.0}, "`value_learning_rate` must be > 0"),
    ],
)
def test_bad_config_values_are_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, **overrides)


def test_constant_rewards_are_warned_about(tmp_path, tiny_model_path, caplog):
    rows = [{"prompt": "ab=", "completion": "ab", "label": True}, {"prompt": "ba=", "completion": "ab", "label": True}]
    DROTrainer(tiny_model_path, args=_config(tmp_path), train_dataset=Dataset.from_list(rows))
    assert "Every training reward equals 1" in caplog.text


def test_reward_funcs_score_the_rows_before_scaling(tmp_path, tiny_model_path):
    dataset = _labelled().remove_columns("label")
    trainer = DROTrainer(tiny_model_path, args=_config(tmp_path), train_dataset=dataset, reward_funcs=sort_reward_func)
    raw = torch.tensor(sort_reward_func(dataset["prompt"], dataset["completion"]), dtype=torch.float64)
    expected = (raw - raw.mean()) / (raw.max() - raw.min())  # the default `reward_scaling="range"`
    torch.testing.assert_close(torch.tensor(trainer.train_dataset["reward"], dtype=torch.float64), expected)


def test_reference_log_probs_are_cached_beside_a_file_backed_dataset(tmp_path, tiny_model_path):
    _labelled().to_json(str(tmp_path / "data.json"))
    cache_dir = tmp_path / "cache"
    dataset = load_dataset("json", data_files=str(tmp_path / "data.json"), split="train", cache_dir=str(cache_dir))
    first = DROTrainer(tiny_model_path, args=_config(tmp_path / "a"), train_dataset=dataset)
    [metrics_file] = glob.glob(str(cache_dir / "**" / "*.arrow.json"), recursive=True)
    # Mark the cached metrics: a trainer that reads the cache back shows the mark, one that recomputes does not
    with open(metrics_file, "w") as f:
        json.dump({"cache/mark": 1.0}, f)
    second = DROTrainer(tiny_model_path, args=_config(tmp_path / "b"), train_dataset=dataset)
    assert second.precompute_metrics["cache/mark"] == 1.0
    assert second.train_dataset["ref_logp"] == first.train_dataset["ref_logp"]
    other = DROTrainer(
        build_tiny_model(str(tmp_path / "other"), seed=1), args=_config(tmp_path / "c"), train_dataset=dataset
    )
    assert "cache/mark" not in other.precompute_metrics
    assert other.train_dataset["ref_logp"] != first.train_dataset["ref_logp"]


# -- PEFT -------------------------------------------------------------------------------------------------------------


def test_peft_trains_the_adapters_and_the_value_network_only(tmp_path, tiny_model_path):
    trainer = DROTrainer(tiny_model_path, args=_config(tmp_path), train_dataset=_labelled(), peft_config=LORA)
    # The reference is the base model with the adapters disabled
    batch = first_batch(trainer)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    with torch.no_grad():
        torch.testing.assert_close(batch["ref_logp"], naive_sequence_logps(base, batch), rtol=0, atol=1e-4)
    # The value network is a separate copy of the base, without adapters
    assert not any("lora_" in name for name, _ in trainer.value_model.named_parameters())

    before = _parameters(trainer.model)
    trainer.train()
    changed = {name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])}
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert all("lora_" in name or ".dro_value." in name for name in trainable)
    assert changed <= trainable
    assert any("lora_B" in name for name in changed) and any(".dro_value.body." in name for name in changed)


def test_peft_live_reference_stays_the_base_model_while_the_adapters_train(tmp_path, tiny_model_path):
    trainer = DROTrainer(
        tiny_model_path,
        args=_config(tmp_path, precompute_ref_log_probs=False),
        train_dataset=_labelled(),
        peft_config=LORA,
    )
    assert trainer.ref_model is None  # no copy of the model: the base with adapters disabled is the reference
    trainer.train()
    batch = first_batch(trainer)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    with torch.no_grad(), trainer._live_reference(trainer.model) as reference:
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        outputs = reference(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels, fused_lm_head=True
        )
        live = trainer._sequence_logps(outputs, batch["completion_mask"])
    with torch.no_grad():
        torch.testing.assert_close(live, naive_sequence_logps(base, batch), rtol=0, atol=1e-4)
        assert not torch.allclose(naive_sequence_logps(trainer.model, batch), live, atol=1e-3)  # adapters moved


def test_value_adapter_shares_the_frozen_base_with_the_policy(tmp_path, tiny_model_path):
    # value_network="adapter": the value is a second LoRA adapter on the same base plus a head, no second base copy
    trainer = DROTrainer(
        tiny_model_path, args=_config(tmp_path, value_network="adapter"), train_dataset=_labelled(), peft_config=LORA
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    lora_size = sum(p.numel() for n, p in trainer.model.named_parameters() if "lora_" in n)
    head_size = sum(p.numel() for p in trainer.value_model.parameters())
    total = sum(p.numel() for p in trainer.model.parameters())
    assert total == sum(p.numel() for p in base.parameters()) + lora_size + head_size
    before = _parameters(trainer.model)
    trainer.train()
    changed = {name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])}
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert changed <= trainable
    assert all("lora_" in name or ".dro_value.head." in name for name in trainable)
    for adapter in ("default", "value"):  # the policy's adapter and the value's both train
        assert any(f"lora_B.{adapter}." in name for name in changed), adapter
    assert any(".dro_value.head." in name for name in changed)

    # V(x) is read from the base run with the value's adapter, not the policy's
    batch = first_batch(trainer)
    policy = trainer.model.get_base_model()
    prompt = batch["input_ids"][:1, : int(batch["completion_mask"][0].argmax())]
    with torch.no_grad():
        outputs = policy(
            **_forward_kwargs(batch), value_prompt_mask=batch["attention_mask"] * (1 - batch["completion_mask"])
        )
        with active_adapter_layers(policy, "value"):
            hidden = policy.base_model(input_ids=prompt).last_hidden_state[0, -1]
        with_policy_adapter = policy.base_model(input_ids=prompt).last_hidden_state[0, -1]
    head = trainer.value_model.head
    assert outputs.prompt_values[0].item() == pytest.approx(head(hidden).item(), abs=1e-5)
    assert outputs.prompt_values[0].item() != pytest.approx(head(with_policy_adapter).item(), abs=1e-5)


def test_value_adapter_needs_peft(tmp_path, tiny_model_path):
    with pytest.raises(ValueError, match="`value_network='adapter'` puts the value in a second PEFT adapter"):
        DROTrainer(tiny_model_path, args=_config(tmp_path, value_network="adapter"), train_dataset=_labelled())


# -- saving and resuming ----------------------------------------------------------------------------------------------


def test_save_model_writes_the_policy_the_value_network_and_a_model_card(tmp_path, tiny_model_path):
    trainer = DROTrainer(tiny_model_path, args=_config(tmp_path / "out"), train_dataset=_labelled())
    trainer.train()
    saved = tmp_path / "saved"
    trainer.save_model(str(saved))

    # The policy is a plain causal LM, without the value's weights
    assert not [key for key in load_file(str(saved / "model.safetensors")) if "dro_value" in key]
    loaded = AutoModelForCausalLM.from_pretrained(str(saved))
    trained = dict(trainer.model.named_parameters())
    assert set(dict(loaded.named_parameters())) == {n for n in trained if not n.startswith("dro_value.")}
    for name, param in loaded.named_parameters():
        assert torch.equal(param, trained[name]), name
    # The value network, from its subfolder, gives the trained values
    value = PromptValueModel.from_pretrained(str(saved / "value"))
    batch = first_batch(trainer)
    with torch.no_grad():
        torch.testing.assert_close(naive_values(value, batch), naive_values(trainer.value_model, batch))
    assert (saved / "value" / "value_head.safetensors").is_file()
    card = (saved / "README.md").read_text()
    assert "DRO" in card and "2405.19107" in card and "richemond2024offline" in card


@pytest.mark.parametrize("value_network", ["separate", "policy_head", "adapter"])
def test_resume_from_checkpoint_continues_the_same_run(tmp_path, tiny_model_path, value_network):
    # Four steps in one go, and two steps then a resume from the checkpoint for two more, end with the same policy
    # and value network: the checkpoint restores both, with their optimizer state (AdamW moments matter here)
    dataset = _labelled(32)
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, value_network=value_network)
    peft = {"peft_config": LORA} if value_network == "adapter" else {}
    straight = DROTrainer(tiny_model_path, args=_config(tmp_path / "a", **common), train_dataset=dataset, **peft)
    straight.train()

    resumed = DROTrainer(tiny_model_path, args=_config(tmp_path / "b", **common), train_dataset=dataset, **peft)
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert (checkpoint / "value" / "value_head.safetensors").is_file()
    with CaptureLogger(logging.get_logger("transformers.trainer")) as log:
        resumed.train(resume_from_checkpoint=str(checkpoint))
    assert "missing keys" not in log.out  # the value's weights are read from `value/`, not the policy's checkpoint
    assert resumed.state.global_step == 4
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)

    # ... and the last checkpoint's value network, read back, is the trained one
    value = resumed.value_model
    value.load_weights(str(tmp_path / "a" / "checkpoint-4" / "value"))
    for (name, p), q in zip(value.named_parameters(), straight.value_model.parameters()):
        assert torch.equal(p, q), name


def test_evaluation_logs_the_metrics(tmp_path, tiny_model_path):
    trainer = DROTrainer(
        tiny_model_path, args=_config(tmp_path), train_dataset=_labelled(), eval_dataset=_labelled(8, seed=3)
    )
    metrics = trainer.evaluate()
    batch = trainer.data_collator(list(trainer.eval_dataset))
    assert metrics["eval_loss"] == pytest.approx(0.5 * batch["reward"].square().mean().item(), rel=1e-5)
    for key in ("loss/policy", "loss/value", "residual/mean", "value/mean", "reward/mean"):
        assert f"eval_{key}" in metrics, key
    passed = DROTrainer(tiny_model_path, args=_config(tmp_path / "b"), train_dataset=_labelled())
    assert passed.evaluate(_labelled(8, seed=3))["eval_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-6)


DEEPSPEED_OWN_OPTIMIZER = """
import os
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
from trl_offline import DROConfig, DROTrainer
from trl_offline.offline_kit import make_scored_dataset
deepspeed = {
    "zero_optimization": {"stage": 2},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
    "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
}
args = DROConfig(
    output_dir=os.environ["OUT"], use_cpu=True, bf16=False, report_to="none", deepspeed=deepspeed,
    learning_rate=1e-3, value_learning_rate=1e-2,
)
DROTrainer(os.environ["MODEL"], args=args, train_dataset=make_scored_dataset("prompt_completion", 8, score="label"))
"""


def test_value_learning_rate_with_a_deepspeed_optimizer_is_refused(tmp_path, tiny_model_path):
    # DeepSpeed's own optimizer would give the value the policy's learning rate without a word. In a subprocess: the
    # DeepSpeed engine initialises a process group that must not outlive the test
    env = {**os.environ, "OUT": str(tmp_path), "MODEL": tiny_model_path, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", DEEPSPEED_OWN_OPTIMIZER], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0
    assert "`value_learning_rate` needs the trainer's optimizer" in result.stderr


def test_checkpoints_keep_the_reward_statistics_and_a_resume_reuses_them(tmp_path, tiny_model_path):
    args = _config(tmp_path, max_steps=2, save_strategy="steps", save_steps=1)
    trainer = DROTrainer(tiny_model_path, args=args, train_dataset=_labelled(16))
    trainer.train()
    state = torch.load(tmp_path / "checkpoint-1" / "precompute_state.pt", weights_only=True)
    assert (state["reward_shift"], state["reward_scale"]) == (trainer.reward_shift, trainer.reward_scale)

    # The statistics of the run being resumed win over those computed again (a reward model on a GPU may score the
    # rows differently in the last bits), and the rewards are scaled with them
    state["reward_shift"], state["reward_scale"] = 0.5, 0.25
    torch.save(state, tmp_path / "checkpoint-1" / "precompute_state.pt")
    resumed = DROTrainer(tiny_model_path, args=_config(tmp_path / "resumed", max_steps=2), train_dataset=_labelled(16))
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    assert (resumed.reward_shift, resumed.reward_scale) == (0.5, 0.25)
    labels = _labelled(16)["label"]
    assert resumed.train_dataset["reward"] == pytest.approx([(float(label) - 0.5) / 0.25 for label in labels])


def test_compute_metrics_gets_each_rows_log_probs_value_and_reward(tmp_path, tiny_model_path):
    seen = []
    trainer = DROTrainer(
        tiny_model_path,
        args=_config(tmp_path),
        train_dataset=_labelled(),
        eval_dataset=_labelled(7, seed=3),
        compute_metrics=lambda prediction: seen.append(prediction) or {"rows": len(prediction.label_ids)},
    )
    metrics = trainer.evaluate()
    (prediction,) = seen
    evaluation = trainer.eval_dataset
    assert prediction.predictions.shape == (7, 3) and metrics["eval_rows"] == 7
    # log pi = log pi_ref before training, V(x) = 0 from the zero-initialised head, rewards as scaled
    assert prediction.predictions[:, 0] == pytest.approx(list(evaluation["ref_logp"]), abs=1e-4)
    assert prediction.predictions[:, 1] == pytest.approx(list(evaluation["ref_logp"]), abs=1e-6)
    assert prediction.predictions[:, 2] == pytest.approx([0.0] * 7, abs=1e-6)
    assert prediction.label_ids == pytest.approx(list(evaluation["reward"]), abs=1e-6)


def test_evaluation_logs_how_well_the_value_predicts_each_rows_reward(tmp_path, tiny_model_path):
    # After training V(x) varies across prompts: the logged correlation, from moments summed over 3 batches, is
    # Pearson's over the evaluation rows' V(x) and rewards
    seen = []
    trainer = DROTrainer(
        tiny_model_path,
        args=_config(tmp_path, max_steps=4, learning_rate=1e-2, per_device_eval_batch_size=4),
        train_dataset=_labelled(32),
        eval_dataset=_labelled(11, seed=3),
        compute_metrics=lambda prediction: seen.append(prediction) or {},
    )
    trainer.train()
    metrics = trainer.evaluate()
    (prediction,) = seen
    values, rewards = prediction.predictions[:, 2], prediction.label_ids
    assert values.std() > 0 and rewards.std() > 0
    expected = torch.corrcoef(torch.tensor([values, rewards], dtype=torch.float64))[0, 1].item()
    assert metrics["eval_value/reward_correlation"] == pytest.approx(expected, abs=1e-4)
    assert "value/reward_correlation" in next(log for log in trainer.state.log_history if "loss/value" in log)


# -- a user's optimizer -----------------------------------------------------------------------------------------------


def test_a_user_optimizer_must_hold_the_value_network(tmp_path, tiny_model_path):
    # Built before the trainer, an optimizer cannot hold the value network the trainer builds: refused at once
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    with pytest.raises(ValueError, match=r"does not hold \d+ of the \d+ parameters of DRO's value network"):
        DROTrainer(
            model,
            args=_config(tmp_path / "early"),
            train_dataset=_labelled(),
            optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None),
        )

    trainer = DROTrainer(tiny_model_path, args=_config(tmp_path), train_dataset=_labelled())
    value_ids = {id(p) for p in trainer.value_parameters()}
    # The policy's parameters only: the value network would never train
    trainer.optimizer = torch.optim.SGD([p for p in trainer.model.parameters() if id(p) not in value_ids], lr=0.1)
    with pytest.raises(ValueError, match="trainer.model.parameters()"):
        trainer.train()
    assert trainer.state.global_step == 0
    # Every parameter, but with `value_learning_rate`, which only the trainer's own optimizer can apply
    trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.1)
    trainer.args.value_learning_rate = 0.5
    with pytest.raises(ValueError, match="`value_learning_rate=0.5` sets the value network's learning rate"):
        trainer.train()

    # Built after the trainer over the whole model, it is used as it is and trains both networks
    trainer.args.value_learning_rate = None
    optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.1)
    trainer.optimizer = optimizer
    value_before, policy_before = _parameters(trainer.value_model), _parameters(trainer.model.model)
    trainer.train()
    assert trainer.state.global_step == 3 and trainer.optimizer.optimizer is optimizer  # accelerate wraps it
    assert all(not torch.equal(p, value_before[n]) for n, p in trainer.value_model.named_parameters())
    changed = [n for n, p in trainer.model.model.named_parameters() if not torch.equal(p, policy_before[n])]
    assert any(not n.startswith("dro_value.") for n in changed)


# -- a pretrained PEFT model --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value_network", ["separate", "adapter"])
def test_a_pretrained_peft_model_is_its_own_reference(tmp_path, tiny_model_path, value_network):
    # An adapter already trained (LoRA B non-zero), passed as the model: the reference is the model as passed, in
    # both reference modes, as KTOTrainer has it
    from peft import get_peft_model

    torch.manual_seed(0)
    pretrained = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_path), LORA)
    for name, parameter in pretrained.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.5)
    dataset, common = _labelled(), dict(value_network=value_network, max_steps=2)
    precomputed = DROTrainer(copy.deepcopy(pretrained), args=_config(tmp_path / "a", **common), train_dataset=dataset)
    live = DROTrainer(
        pretrained, args=_config(tmp_path / "b", precompute_ref_log_probs=False, **common), train_dataset=dataset
    )
    assert live.ref_model is None and "ref" in live.model.peft_config

    def live_reference_logps(indices):
        batch = live._prepare_inputs(live.collate_rows(live.train_dataset, indices))
        with torch.no_grad(), live._live_reference(live.model) as reference:
            return live._sequence_logps(reference(**_forward_kwargs(batch)), batch["completion_mask"]), batch

    indices = [0, 5, 11]
    expected = torch.tensor(precomputed.train_dataset.select(indices)["ref_logp"])
    live_logps, batch = live_reference_logps(indices)
    torch.testing.assert_close(live_logps, expected, rtol=0, atol=1e-4)
    with torch.no_grad():  # the base alone is another model
        base_logps = naive_sequence_logps(AutoModelForCausalLM.from_pretrained(tiny_model_path), batch)
    assert (base_logps - expected).abs().max() > 0.1

    before = _parameters(live.model)
    live.train()
    changed = {name for name, p in live.model.named_parameters() if not torch.equal(p, before[name])}
    trainable = {name for name, p in live.model.named_parameters() if p.requires_grad}
    assert changed <= trainable and not any(".ref." in name for name in trainable)
    assert any("lora_B.default." in name for name in changed) and any(".dro_value." in name for name in changed)
    if value_network == "adapter":
        assert any("lora_B.value." in name for name in changed)
    # The frozen copy still gives the reference of before training, while the policy has moved
    torch.testing.assert_close(live_reference_logps(indices)[0], expected, rtol=0, atol=1e-4)
    with torch.no_grad():
        assert not torch.allclose(naive_sequence_logps(live.model, batch), expected, atol=1e-3)


def test_a_peft_model_with_an_adapter_named_ref_is_refused_for_live_reference_passes(tmp_path, tiny_model_path):
    from peft import get_peft_model

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_path), LORA)
    model.add_adapter("ref", LORA)
    with pytest.raises(ValueError, match="The model already has an adapter named 'ref'"):
        DROTrainer(model, args=_config(tmp_path, precompute_ref_log_probs=False), train_dataset=_labelled())
