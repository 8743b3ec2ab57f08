import re

import pytest
import torch
from helpers import cpu_run_args, first_batch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, TrainingArguments
from trl import SFTConfig, SFTTrainer

from trl_offline import IQLearnConfig, IQLearnTrainer
from trl_offline.offline_kit import make_dataset


def _config(tmp_path, **overrides) -> IQLearnConfig:
    # TRL's default checkpointing kept on: the soft-Q op recomputes under it
    return IQLearnConfig(**cpu_run_args(tmp_path, **{"gradient_checkpointing": True, **overrides}))


def naive_iqlearn_loss(model, batch, td_coef, gamma):
    """The IQLearn loss from the full logits and an explicit loop over positions, independent of the package."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    target = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    lse = logits.logsumexp(-1)
    total = logits.new_zeros(())
    rewards = []
    for b in range(labels.shape[0]):
        actions = mask[b].nonzero().flatten().tolist()
        reward = logits.new_zeros(())
        for i, t in enumerate(actions):
            v_next = lse[b, actions[i + 1]] if i + 1 < len(actions) else 0.0
            delta = target[b, t] - gamma * v_next
            total = total + (lse[b, t] - target[b, t]) + td_coef * delta**2
            reward = reward + delta
        rewards.append(reward)
    return total / mask.sum(), torch.stack(rewards)


@pytest.mark.parametrize(
    "model_fixture,dataset_format",
    [
        ("tiny_model_path", "prompt_completion"),
        ("tiny_model_path", "conversational_multi_turn"),
        ("tiny_tied_model_path", "prompt_completion"),  # GPT-2 with the LM head tied to the input embeddings
    ],
)
def test_loss_matches_naive_full_logits_computation(tmp_path, request, model_fixture, dataset_format):
    # Guards the whole training loss path (data prep, masks, soft-Q head, reduction) against an independent loop,
    # including multi-turn rows where the TD target must skip the user's turn.
    args = _config(tmp_path, td_coef=0.3, gamma=0.9, assistant_only_loss=dataset_format.startswith("conversational"))
    model_path = request.getfixturevalue(model_fixture)
    trainer = IQLearnTrainer(model_path, args=args, train_dataset=make_dataset(dataset_format, 8))
    batch = first_batch(trainer)
    loss = trainer.compute_loss(trainer.model, batch)
    expected, _ = naive_iqlearn_loss(trainer.model, batch, td_coef=0.3, gamma=0.9)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)

    # The gradient agrees too, on every parameter
    grads = torch.autograd.grad(loss, list(trainer.model.parameters()), allow_unused=True)
    expected_grads = torch.autograd.grad(expected, list(trainer.model.parameters()), allow_unused=True)
    for got, want in zip(grads, expected_grads):
        if want is None:
            assert got is None or torch.count_nonzero(got) == 0
        else:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "dataset_format", ["language_modeling", "prompt_completion", "conversational_prompt_completion"]
)
def test_zero_td_coef_equals_sft_trainer_loss(tmp_path, tiny_model_path, dataset_format):
    # td_coef=0 must be exactly SFT: same data preparation, same masks, same reduction
    dataset = make_dataset(dataset_format, 8)
    sft_args = SFTConfig(output_dir=str(tmp_path / "sft"), use_cpu=True, bf16=False, report_to="none")
    sft = SFTTrainer(tiny_model_path, args=sft_args, train_dataset=dataset)
    iq = IQLearnTrainer(tiny_model_path, args=_config(tmp_path, td_coef=0.0), train_dataset=dataset)
    batch = first_batch(sft)
    torch.testing.assert_close(
        iq.compute_loss(iq.model, dict(batch)), sft.compute_loss(sft.model, dict(batch)), rtol=1e-6, atol=1e-6
    )


def test_training_changes_every_parameter_and_logs_metrics(tmp_path, tiny_model_path):
    trainer = IQLearnTrainer(
        tiny_model_path, args=_config(tmp_path), train_dataset=make_dataset("prompt_completion", 16)
    )
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    for name, param in trainer.model.named_parameters():
        assert not torch.equal(param, before[name]), f"{name} did not change"
    logged = trainer.state.log_history[0]
    for key in ("loss", "nll", "td_loss", "implicit_reward", "entropy", "mean_token_accuracy", "num_tokens"):
        assert key in logged, key
    # The loss is the NLL plus td_coef times the TD term, both logged as token means
    assert logged["loss"] == pytest.approx(logged["nll"] + 0.1 * logged["td_loss"], rel=1e-3)


def test_peft_trains_only_the_adapters(tmp_path, tiny_model_path):
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = IQLearnTrainer(
        tiny_model_path,
        args=_config(tmp_path),
        train_dataset=make_dataset("prompt_completion", 16),
        peft_config=peft_config,
    )
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])}
    adapters = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in name for name in adapters)
    # Every lora_B starts at zero and must move; nothing outside the adapters may move
    assert {name for name in adapters if "lora_B" in name} <= changed
    assert changed <= adapters


def test_conversational_assistant_only_loss_scores_only_assistant_tokens(tmp_path, tiny_model_path):
    trainer = IQLearnTrainer(
        tiny_model_path,
        args=_config(tmp_path, assistant_only_loss=True),
        train_dataset=make_dataset("conversational_multi_turn", 8),
    )
    batch = first_batch(trainer)
    outputs = trainer.model(**batch, soft_q_head=True)
    tokenizer = trainer.processing_class
    for row in range(batch["input_ids"].shape[0]):
        scored = tokenizer.decode(batch["input_ids"][row, 1:][outputs.completion_mask[row]])
        # Only the two assistant replies and their end-of-turn tokens are actions of the policy
        text = tokenizer.decode(batch["input_ids"][row][batch["attention_mask"][row].bool()])
        replies = re.findall(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", text)
        assert len(replies) == 2 and scored == "".join(replies)
    trainer.train()


def test_implicit_rewards_match_naive_sum_in_row_order(tmp_path, tiny_model_path):
    # Rows of different lengths, scored in padded batches, must come back in row order with the reward of an
    # unpadded, one-row-at-a-time naive computation
    dataset = make_dataset("prompt_completion", 10)
    trainer = IQLearnTrainer(tiny_model_path, args=_config(tmp_path, gamma=0.9), train_dataset=dataset)
    rewards = trainer.compute_implicit_rewards(dataset)
    assert len(rewards) == len(dataset)
    prepared = trainer._prepare_dataset(dataset, trainer.processing_class, trainer.args, False, None, "check")
    with torch.no_grad():
        for i, row in enumerate(prepared):
            batch = trainer.data_collator([{"input_ids": row["input_ids"], "labels": row["labels"]}])
            _, expected = naive_iqlearn_loss(trainer.model, batch, td_coef=0.0, gamma=0.9)
            assert rewards[i] == pytest.approx(expected.item(), abs=1e-4)
    assert len(set(rewards)) > 1


def test_model_card_names_the_method_and_cites_the_paper(tmp_path, tiny_model_path):
    trainer = IQLearnTrainer(
        tiny_model_path, args=_config(tmp_path), train_dataset=make_dataset("prompt_completion", 8)
    )
    trainer.save_model(str(tmp_path / "saved"))
    card = (tmp_path / "saved" / "README.md").read_text()
    assert "IQLearn" in card and "2409.01369" in card and "wulfmeier2024imitating" in card
    assert "trl-offline" in card
    # The saved folder is a plain transformers model
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved"))


def test_plain_training_arguments_are_converted(tmp_path, tiny_model_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = IQLearnTrainer(tiny_model_path, args=args, train_dataset=make_dataset("prompt_completion", 8))
    assert isinstance(trainer.args, IQLearnConfig) and trainer.args.td_coef == 0.1


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(packing=True), "packing"),
        (dict(padding_free=True), "padding_free"),
        (dict(loss_type="dft"), "loss_type"),
        (dict(label_smoothing_factor=0.1), "label_smoothing_factor"),
        (dict(td_coef=-1.0), "td_coef"),
        (dict(gamma=0.0), "gamma"),
        (dict(logits_chunk_size=0), "logits_chunk_size"),
    ],
)
def test_configs_iqlearn_cannot_honour_are_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, **overrides)


def test_custom_loss_function_is_refused(tmp_path, tiny_model_path):
    with pytest.raises(ValueError, match="compute_loss_func"):
        IQLearnTrainer(
            tiny_model_path,
            args=_config(tmp_path),
            train_dataset=make_dataset("prompt_completion", 8),
            compute_loss_func=lambda *a, **k: 0.0,
        )


@pytest.mark.parametrize(
    "rows,error,message",
    [
        ([{"prompt": "ab="}], ValueError, "'completion'"),
        ([{"prompt": "ab=", "completion": ""}], ValueError, "Row 0 of column 'completion' is an empty string"),
        ([{"prompt": "ab=", "completion": "ab"}, {"prompt": "ba=", "completion": " "}], ValueError, "Row 1"),
        ([{"text": 3}], TypeError, "Row 0 of column 'text'"),
        ([{"question": "ab"}], ValueError, "expected 'text', 'messages'"),
        (
            [{"messages": [{"role": "user", "content": "ab"}, {"role": "assistant", "content": ""}]}],
            ValueError,
            "no non-empty assistant message",
        ),
    ],
)
def test_bad_datasets_are_refused_before_training(tmp_path, tiny_model_path, rows, error, message):
    from datasets import Dataset

    with pytest.raises(error, match=message):
        IQLearnTrainer(tiny_model_path, args=_config(tmp_path), train_dataset=Dataset.from_list(rows))


def test_gradient_accumulation_gives_the_update_of_the_larger_batch(tmp_path, tiny_model_path):
    # The loss is a token mean over the whole accumulated batch (`num_items_in_batch`), like SFT's. Plain SGD keeps
    # the update proportional to the gradient, so a wrong scale would show (Adam's first step would hide it).
    dataset = make_dataset("prompt_completion", 8)
    common = dict(max_steps=1, optim="sgd", learning_rate=1.0, td_coef=0.5, gamma=0.9)
    one_batch = IQLearnTrainer(
        tiny_model_path, args=_config(tmp_path / "a", per_device_train_batch_size=4, **common), train_dataset=dataset
    )
    accumulated = IQLearnTrainer(
        tiny_model_path,
        args=_config(tmp_path / "b", per_device_train_batch_size=2, gradient_accumulation_steps=2, **common),
        train_dataset=dataset,
    )
    start = {n: p.detach().clone() for n, p in one_batch.model.named_parameters()}
    one_batch.train()
    accumulated.train()
    moved = 0
    for (name, p), q in zip(one_batch.model.named_parameters(), accumulated.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
        moved += not torch.equal(p, start[name])
    assert moved > 0


def test_evaluation_logs_the_same_metrics(tmp_path, tiny_model_path):
    trainer = IQLearnTrainer(
        tiny_model_path,
        args=_config(tmp_path),
        train_dataset=make_dataset("prompt_completion", 8),
        eval_dataset=make_dataset("prompt_completion", 6, seed=1),
    )
    metrics = trainer.evaluate()
    for key in ("eval_loss", "eval_nll", "eval_td_loss", "eval_implicit_reward", "eval_mean_token_accuracy"):
        assert key in metrics, key
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_nll"] + 0.1 * metrics["eval_td_loss"], rel=1e-4)


def test_implicit_rewards_refuse_rows_with_no_completion_left(tmp_path, tiny_model_path):
    # A prompt that fills `max_length` leaves no completion token, hence no reward: an error, not a shorter list
    dataset = make_dataset("prompt_completion", 8)
    trainer = IQLearnTrainer(tiny_model_path, args=_config(tmp_path, max_length=6), train_dataset=dataset)
    with pytest.raises(ValueError, match=r"row\(s\) have no completion token left within `max_length` \(6\)"):
        trainer.compute_implicit_rewards(dataset)
    with pytest.raises(TypeError, match="datasets.Dataset"):
        trainer.compute_implicit_rewards(dataset.to_list())


def test_an_empty_dataset_is_named_before_training(tmp_path, tiny_model_path):
    from datasets import Dataset

    empty = Dataset.from_dict({"prompt": [], "completion": []})
    with pytest.raises(ValueError, match="The train dataset is empty"):
        IQLearnTrainer(tiny_model_path, args=_config(tmp_path), train_dataset=empty)


# -- Mixture-of-Experts and Liger ---------------------------------------------------------------------------------------


def test_moe_load_balancing_loss_is_added_as_sft_adds_it(tmp_path, tiny_moe_model_path):
    dataset = make_dataset("prompt_completion", 8)
    trainer = IQLearnTrainer(
        tiny_moe_model_path, args=_config(tmp_path, td_coef=0.3, gamma=0.9, max_steps=2), train_dataset=dataset
    )
    assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == 0.02  # the config's own coefficient
    batch = first_batch(trainer)
    reference = AutoModelForCausalLM.from_pretrained(tiny_moe_model_path)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
        plain, _ = naive_iqlearn_loss(reference, batch, td_coef=0.3, gamma=0.9)
        # The load-balancing loss of the model's own forward, computed by transformers
        expected_aux = reference(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True
        ).aux_loss
        assert expected_aux > 0
        torch.testing.assert_close(loss, plain + 0.02 * expected_aux, rtol=1e-5, atol=1e-6)
        # With the loss normalised over an accumulated batch, the per-micro-batch aux loss is averaged over its steps
        trainer.current_gradient_accumulation_steps = 2
        num_tokens = (batch["labels"][:, 1:] != -100).sum()
        accumulated = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=num_tokens)
        torch.testing.assert_close(accumulated, plain + 0.01 * expected_aux, rtol=1e-5, atol=1e-6)
    trainer.train()  # and it trains with it, logging it
    logged = [log["aux_loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(logged) == 2 and all(aux > 0 for aux in logged)

    off = IQLearnTrainer(
        tiny_moe_model_path,
        args=_config(tmp_path / "off", td_coef=0.3, gamma=0.9, router_aux_loss_coef=0.0),
        train_dataset=dataset,
    )
    assert not off.aux_loss_enabled
    with torch.no_grad():
        torch.testing.assert_close(off.compute_loss(off.model, dict(batch)), plain, rtol=1e-5, atol=1e-6)


def test_liger_fused_linear_cross_entropy_is_refused(tmp_path, tiny_model_path):
    # It would replace the forward that carries the soft-Q head; Liger's layer kernels alone leave it in place
    args = _config(tmp_path, use_liger_kernel=True, liger_kernel_config={"fused_linear_cross_entropy": True})
    with pytest.raises(ValueError, match="fused_linear_cross_entropy.*IQLearn reads `Q\\(s, a\\)` and `V\\(s\\)`"):
        IQLearnTrainer(tiny_model_path, args=args, train_dataset=make_dataset("prompt_completion", 8))
