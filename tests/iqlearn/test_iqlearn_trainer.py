import re

import pytest
import torch
from helpers import cpu_run_args, first_batch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, TrainingArguments
from transformers.utils import logging as hf_logging
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from trl_offline import IQLearnConfig, IQLearnTrainer
from trl_offline.losses import iqlearn_loss
from trl_offline.offline_kit import make_dataset


def _config(tmp_path, **overrides) -> IQLearnConfig:
    # TRL's default checkpointing kept on: the soft-Q op recomputes under it
    return IQLearnConfig(**cpu_run_args(tmp_path, **{"gradient_checkpointing": True, **overrides}))


def naive_iqlearn_loss(model, batch, td_coef, gamma, head=None, cut_rows=()):
    """The IQLearn loss from the full logits and an explicit loop over positions, independent of the package.

    With a value head (`head`, or the model's own `soft_value_head`), `Q = v(s) + log pi` and `V = v`; without one,
    `Q` is the logit and `V` the logsumexp. The last action of a row in `cut_rows` bootstraps from `v` after it (with
    a head) or has no TD term (without)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = head if head is not None else getattr(base, "soft_value_head", None)
    outputs = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=head is not None
    )
    logits = outputs.logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    target = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    lse = logits.logsumexp(-1)
    if head is None:
        q, v = target, lse
    else:
        hidden = outputs.hidden_states[-1]
        hidden = hidden if head.backprop else hidden.detach()
        v_all = (hidden @ head.linear.weight[0] + head.linear.bias[0]).float()  # v(s_t), read at position t
        v = v_all[:, :-1]
        q = v + target - lse
    total = logits.new_zeros(())
    rewards = []
    for b in range(labels.shape[0]):
        actions = mask[b].nonzero().flatten().tolist()
        reward = logits.new_zeros(())
        for i, t in enumerate(actions):
            total = total + (lse[b, t] - target[b, t])
            cut = i + 1 == len(actions) and b in cut_rows
            if cut and head is None:
                continue  # no value to bootstrap from: no TD target
            v_next = v[b, actions[i + 1]] if i + 1 < len(actions) else (v_all[b, t + 1] if cut else 0.0)
            delta = q[b, t] - gamma * v_next
            total = total + td_coef * delta**2
            reward = reward + delta
        rewards.append(reward)
    return total / mask.sum(), torch.stack(rewards)


def _randomize_value_head(trainer, scale=0.3):
    """An untrained head predicts 0 everywhere, which would hide a misread value: give it weights."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in trainer.soft_value_head.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


@pytest.mark.parametrize(
    "model_fixture,dataset_format,value",
    [
        ("tiny_model_path", "prompt_completion", {}),
        ("tiny_model_path", "conversational_multi_turn", {}),
        ("tiny_tied_model_path", "prompt_completion", {}),  # GPT-2 with the LM head tied to the input embeddings
        ("tiny_model_path", "prompt_completion", {"soft_value_backprop": True}),
        ("tiny_model_path", "conversational_multi_turn", {"soft_value": "logsumexp"}),
    ],
)
def test_loss_matches_naive_full_logits_computation(tmp_path, request, model_fixture, dataset_format, value):
    # Guards the whole training loss path (data prep, masks, soft-Q head, value head, reduction) against an
    # independent loop, including multi-turn rows where the TD target must skip the user's turn.
    conversational = dataset_format.startswith("conversational")
    args = _config(tmp_path, td_coef=0.3, gamma=0.9, assistant_only_loss=conversational, **value)
    model_path = request.getfixturevalue(model_fixture)
    trainer = IQLearnTrainer(model_path, args=args, train_dataset=make_dataset(dataset_format, 8))
    if trainer.soft_value_head is not None:
        _randomize_value_head(trainer)
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


def test_zero_td_coef_trains_exactly_as_sft_trainer(tmp_path, tiny_model_path):
    # The same batches in the same order, the same updates: the learned value head draws no random numbers
    dataset = make_dataset("prompt_completion", 32)
    sft = SFTTrainer(tiny_model_path, args=SFTConfig(**cpu_run_args(tmp_path / "sft")), train_dataset=dataset)
    iq = IQLearnTrainer(tiny_model_path, args=_config(tmp_path / "iq", td_coef=0.0), train_dataset=dataset)
    sft.train()
    iq.train()
    iq_parameters = dict(iq.model.named_parameters())
    for name, parameter in sft.model.named_parameters():
        torch.testing.assert_close(iq_parameters[name], parameter, msg=name)


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
    assert logged["loss"] == pytest.approx(logged["nll"] + 0.03 * logged["td_loss"], rel=1e-3)  # the default


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
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    head = {"base_model.model.soft_value_head.linear.weight", "base_model.model.soft_value_head.linear.bias"}
    assert head <= trainable and all("lora_" in name for name in trainable - head)
    # Every lora_B starts at zero and must move, and the value head trains with the adapters; nothing else may move
    assert {name for name in trainable if "lora_B" in name} | head <= changed
    assert changed <= trainable


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
    _randomize_value_head(trainer)  # the rewards read the learned value
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
    assert isinstance(trainer.args, IQLearnConfig) and trainer.args.td_coef == 0.03


@pytest.mark.parametrize(
    "overrides,message",
    [
        # Packed evaluation rows keep their boundaries only in padding-free batches
        (dict(eval_packing=True), "`eval_packing=True` without padding-free batches"),
        (dict(loss_type="dft"), "loss_type"),
        (dict(label_smoothing_factor=0.1), "label_smoothing_factor"),
        (dict(td_coef=-1.0), "td_coef"),
        (dict(soft_value="lse"), "`soft_value` must be 'head' or 'logsumexp', got 'lse'"),
        (dict(soft_value="logsumexp", soft_value_backprop=True), "`soft_value_backprop=True` .* needs"),
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
        eval_dataset=make_dataset("prompt_completion", 8, seed=1),  # batches of equal size: the loss is their mean
    )
    metrics = trainer.evaluate()
    for key in ("eval_loss", "eval_nll", "eval_td_loss", "eval_implicit_reward", "eval_mean_token_accuracy"):
        assert key in metrics, key
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_nll"] + 0.03 * metrics["eval_td_loss"], rel=1e-4)


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
        plain, _ = naive_iqlearn_loss(reference, batch, td_coef=0.3, gamma=0.9, head=trainer.soft_value_head)
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


# -- Packing and padding-free batches -----------------------------------------------------------------------------------

PACKED_BATCHES = [
    pytest.param(dict(packing=True, eval_packing=True, max_length=64), id="packing"),
    # SFT enforces no `max_length` on padding-free rows that are not packed, so it asks for none
    pytest.param(dict(padding_free=True, max_length=None), id="padding_free"),
]


def _padded_rows(trainer, batch) -> dict:
    """The sequences of a padding-free batch (one row, `position_ids` restarting at 0), one per right-padded row."""
    positions = batch["position_ids"][0].tolist()
    starts = [t for t, position in enumerate(positions) if position == 0] + [len(positions)]
    rows = [
        {"input_ids": batch["input_ids"][0, s:e].tolist(), "labels": batch["labels"][0, s:e].tolist()}
        for s, e in zip(starts, starts[1:])
    ]
    collator = DataCollatorForLanguageModeling(pad_token_id=trainer.processing_class.pad_token_id)
    return trainer._prepare_inputs(collator(rows))


@pytest.mark.parametrize("overrides", PACKED_BATCHES)
# "logsumexp": V(s') is the logits' logsumexp, far from 0, so bootstrapping across a boundary would show; "head": the
# learned value, zero at init, checks that its inputs are plumbed through packed rows too
@pytest.mark.parametrize("soft_value", ["logsumexp", "head"])
def test_packed_and_padding_free_batches_match_the_same_rows_padded(tmp_path, tiny_model_path, overrides, soft_value):
    # The sequences joined in one row must give exactly the loss, gradients and logged metrics of the same sequences
    # in padded rows: the TD term and the attention both stop at each sequence's end
    trainer = IQLearnTrainer(
        tiny_model_path,
        args=_config(tmp_path, td_coef=0.5, gamma=0.9, soft_value=soft_value, **overrides),
        train_dataset=make_dataset("prompt_completion", 8),
    )
    packed = first_batch(trainer)
    padded = _padded_rows(trainer, packed)
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == 1
    assert padded["input_ids"].shape[0] >= 4 and not padded["attention_mask"].all()  # several rows, of unequal lengths

    model, params = trainer.model, [p for p in trainer.model.parameters() if p.requires_grad]
    model.train()
    loss = trainer.compute_loss(model, dict(packed))
    expected = trainer.compute_loss(model, dict(padded))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    expected_grads = torch.autograd.grad(expected, params, allow_unused=True)
    for got, want in zip(grads, expected_grads):
        assert (got is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    for key in ("nll", "td_loss", "implicit_reward", "entropy", "mean_token_accuracy"):
        packed_value, padded_value = trainer._metrics["train"][key]
        assert packed_value == pytest.approx(padded_value, rel=1e-5, abs=1e-6), key
    # Both count the same real tokens (the packed row has no padding)
    assert trainer._metrics["train"]["num_tokens"] == [2 * packed["input_ids"].shape[1]]

    if soft_value == "logsumexp":
        # Bootstrapping across the boundaries instead would change the loss, so the comparison above can fail
        with torch.no_grad():
            outputs = model(**packed, soft_q_head=True)
            across, _ = iqlearn_loss(
                outputs.target_logits, outputs.logsumexp, outputs.completion_mask, td_coef=0.5, gamma=0.9
            )
        assert not torch.allclose(across.sum() / outputs.completion_mask.sum(), expected, rtol=1e-3)


@pytest.mark.parametrize("overrides", PACKED_BATCHES)
def test_packing_and_padding_free_train_evaluate_and_score_rows(tmp_path, tiny_model_path, overrides):
    dataset = make_dataset("prompt_completion", 8)
    trainer = IQLearnTrainer(
        tiny_model_path,
        args=_config(tmp_path / "packed", max_steps=2, gamma=0.9, **overrides),
        train_dataset=dataset,
        eval_dataset=make_dataset("prompt_completion", 4, seed=1),  # one batch: the logged means are its own
    )
    # Implicit rewards stay one per row, in row order, equal to those of a trainer on padded rows
    padded = IQLearnTrainer(tiny_model_path, args=_config(tmp_path / "padded", gamma=0.9), train_dataset=dataset)
    rewards = trainer.compute_implicit_rewards(dataset)
    assert rewards == pytest.approx(padded.compute_implicit_rewards(dataset), abs=1e-5)
    assert len(set(rewards)) > 1 and trainer.data_collator.padding_free  # the padding-free collator is restored

    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    for name, param in trainer.model.named_parameters():
        assert not torch.equal(param, before[name]), f"{name} did not change"
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(log["loss"])) for log in logs)
    assert logs[0]["num_tokens"] > 0
    # Evaluation runs on packed rows too with `eval_packing`, padding-free ones with `padding_free`
    assert len(trainer.eval_dataset) < 4 if trainer.args.eval_packing else len(trainer.eval_dataset) == 4
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_nll"] + 0.03 * metrics["eval_td_loss"], rel=1e-4)


def test_wrapped_packing_warns_that_each_row_is_one_episode(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        _config(tmp_path, packing=True, packing_strategy="wrapped")
    assert "treats each packed row as one episode" in caplog.text


# -- The learned value (`soft_value="head"`), truncation and the first-step check ------------------------------------

HEAD_KEYS = {"linear.weight", "linear.bias"}


def test_truncated_actions_are_the_last_actions_of_sequences_cut_at_max_length():
    from trl_offline.iqlearn.soft_value import truncated_actions

    eos = torch.tensor([4, 9])
    # max_length 5: row 0 fills it and ends in eos (4), row 1 fills it and is cut, row 2 is shorter (padded): ended
    labels = torch.tensor([[-100, -100, 5, 6, 4], [-100, -100, 5, 6, 7], [-100, 5, 6, -100, -100]])
    mask = labels[:, 1:] != -100
    expected = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]]).bool()
    assert torch.equal(truncated_actions(labels, mask, eos, max_length=5), expected)
    assert not truncated_actions(labels, mask, eos, max_length=None).any()
    # One packed row: a sequence of 5 tokens cut (its last action is not eos), then one of 3 that ended with 9
    labels = torch.tensor([[-100, -100, 5, 6, 7, -100, 5, 9]])
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2]])
    segments = torch.tensor([[0, 0, 0, 0, 1, 1, 1]])  # of the states at t = 0..6
    mask = labels[:, 1:] != -100
    cut = truncated_actions(labels, mask, eos, 5, position_ids=positions, segment_ids=segments)
    assert cut.nonzero().tolist() == [[0, 3]]


@pytest.mark.parametrize("soft_value", ["head", "logsumexp"])
def test_rows_cut_by_max_length_are_not_episode_ends(tmp_path, tiny_model_path, soft_value):
    # Rows cut at 12 tokens lose their eos; the loss must bootstrap from v after the cut (head) or drop that target
    # (logsumexp), as the independent loop does, and differ from treating the cut as an end
    args = _config(tmp_path, td_coef=0.3, gamma=0.9, max_length=12, soft_value=soft_value)
    trainer = IQLearnTrainer(tiny_model_path, args=args, train_dataset=make_dataset("prompt_completion", 8))
    if soft_value == "head":
        _randomize_value_head(trainer)
    batch = first_batch(trainer)
    eos = trainer.processing_class.eos_token_id
    lengths = batch["attention_mask"].sum(-1)
    cut_rows = {b for b in range(len(lengths)) if lengths[b] == 12 and batch["input_ids"][b, 11] != eos}
    assert cut_rows
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
        expected, _ = naive_iqlearn_loss(trainer.model, batch, td_coef=0.3, gamma=0.9, cut_rows=cut_rows)
        as_ended, _ = naive_iqlearn_loss(trainer.model, batch, td_coef=0.3, gamma=0.9)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    assert (loss - as_ended).abs() > 1e-3


def test_value_head_trains_saves_and_reloads_on_a_pretrained_start(tmp_path, pretrained_tiny_model_path, caplog):

    dataset = make_dataset("prompt_completion", 16)
    trainer = IQLearnTrainer(pretrained_tiny_model_path, args=_config(tmp_path / "run"), train_dataset=dataset)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    with caplog.at_level("INFO", logger="trl_offline"):
        trainer.train()
    # The first-step check: the TD term against the NLL, logged once; small with the learned value, so no warning
    assert caplog.text.count("IQLearn at the first step: td_coef * td_loss =") == 1
    assert "dominates" not in caplog.text
    for name, param in trainer.model.named_parameters():
        assert not torch.equal(param, before[name]), f"{name} did not change"
    assert trainer.soft_value_head.linear.weight.abs().sum() > 0

    rows = make_dataset("prompt_completion", 6, seed=1)
    rewards = trainer.compute_implicit_rewards(rows)
    out = tmp_path / "saved"
    _save_with_the_head_beside(trainer, out, "model.safetensors")  # the policy is a plain causal LM
    _, loading = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"]

    # A trainer built on the saved folder loads the head, and extracts the same rewards
    reloaded = IQLearnTrainer(str(out), args=_config(tmp_path / "scoring"), train_dataset=dataset)
    torch.testing.assert_close(reloaded.soft_value_head.linear.weight, trainer.soft_value_head.linear.weight)
    assert reloaded.compute_implicit_rewards(rows) == pytest.approx(rewards, abs=1e-5)
    # Resuming from a checkpoint loads it too, without a warning about the keys the policy's file does not hold
    fresh = IQLearnTrainer(pretrained_tiny_model_path, args=_config(tmp_path / "resume"), train_dataset=dataset)
    caplog.clear()
    hf_logging.enable_propagation()  # the Trainer's own warnings, for caplog
    try:
        with caplog.at_level("WARNING"):
            fresh._load_from_checkpoint(str(out))
            assert "soft_value_head" not in caplog.text
            # TRL's own check would name the head's keys as missing from the policy's weights
            SFTTrainer._issue_warnings_after_load(fresh, fresh.model.load_state_dict({}, strict=False))
            assert "soft_value_head.linear.weight" in caplog.text
    finally:
        hf_logging.disable_propagation()
    torch.testing.assert_close(fresh.soft_value_head.linear.bias, trainer.soft_value_head.linear.bias)


def _save_with_the_head_beside(trainer, out, weights_file: str) -> None:
    """`save_model(out)` writes the policy's weights without the value head's keys, and the head beside them."""
    from safetensors.torch import load_file

    trainer.save_model(str(out))
    assert not any("soft_value" in key for key in load_file(out / weights_file))
    assert set(load_file(out / "soft_value_head.safetensors")) == HEAD_KEYS


@pytest.mark.parametrize("soft_value", ["logsumexp", "head"])
def test_first_step_warns_when_the_td_term_dominates(tmp_path, pretrained_tiny_model_path, caplog, soft_value):
    # On a pretrained start the logits' logsumexp is far from 0, so the original contract's TD term swamps the NLL;
    # the learned value starts at 0 and its TD term stays below the NLL at the same td_coef
    args = _config(tmp_path, max_steps=1, td_coef=0.3, soft_value=soft_value)
    trainer = IQLearnTrainer(pretrained_tiny_model_path, args=args, train_dataset=make_dataset("prompt_completion", 8))
    with caplog.at_level("WARNING", logger="trl_offline"):
        trainer.train()
    logged = trainer.state.log_history[0]
    dominates = 0.3 * logged["td_loss"] > logged["nll"]
    assert dominates == (soft_value == "logsumexp")
    assert ("The TD term dominates the loss at the first step" in caplog.text) == dominates
    if dominates:
        assert "td_coef=0.3, soft_value='logsumexp'" in caplog.text and "`soft_value='head'`" in caplog.text


def test_peft_saves_the_value_head_beside_the_adapter(tmp_path, pretrained_tiny_model_path):
    from peft import PeftModel

    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    dataset = make_dataset("prompt_completion", 8)
    trainer = IQLearnTrainer(
        pretrained_tiny_model_path, args=_config(tmp_path / "run"), train_dataset=dataset, peft_config=peft_config
    )
    trainer.train()
    rows = make_dataset("prompt_completion", 4, seed=1)
    rewards = trainer.compute_implicit_rewards(rows)
    out = tmp_path / "adapter"
    _save_with_the_head_beside(trainer, out, "adapter_model.safetensors")

    # The documented way to score with a saved adapter: load it, then its head
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pretrained_tiny_model_path), str(out))
    scorer = IQLearnTrainer(model, args=_config(tmp_path / "scoring"), train_dataset=dataset)
    assert scorer.compute_implicit_rewards(rows) != pytest.approx(rewards, abs=1e-5)  # an untrained head
    scorer.load_soft_value_head(str(out))
    assert scorer.compute_implicit_rewards(rows) == pytest.approx(rewards, abs=1e-5)


def test_a_user_optimizer_gets_the_value_head(tmp_path, tiny_model_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    dataset = make_dataset("prompt_completion", 8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = IQLearnTrainer(
        model, args=_config(tmp_path, max_steps=1), train_dataset=dataset, optimizers=(optimizer, None)
    )
    trainer.train()
    head = trainer.soft_value_head
    assert optimizer.param_groups[-1]["params"] == list(head.parameters()) and head.linear.weight.abs().sum() > 0
    # With the user's scheduler too, the head's group would escape it
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    trainer = IQLearnTrainer(
        model, args=_config(tmp_path, max_steps=1), train_dataset=dataset, optimizers=(optimizer, scheduler)
    )
    with pytest.raises(ValueError, match="an optimizer and scheduler made before the trainer cannot hold"):
        trainer.train()
