import glob
import json
import math
import os
from collections import Counter

import pytest
import torch
from datasets import Dataset, load_dataset
from helpers import cpu_run_args, first_batch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_offline import ALoLConfig, ALoLTrainer
from trl_offline.losses.alol import VARIANTS
from trl_offline.offline_kit import build_tiny_model, greedy_completions, make_scored_dataset, sort_reward_func


WEIGHTED = ("alol", "alol_seq")  # the variants with an importance weight


def _config(tmp_path, **overrides) -> ALoLConfig:
    defaults = dict(
        value_num_prompts=8,
        value_num_epochs=2,
        value_validation_fraction=0.25,  # two held-out prompts, so the explained variance is a number,
        max_completion_length=4,
    )
    return ALoLConfig(**cpu_run_args(tmp_path, **{**defaults, **overrides}))


def naive_token_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities `(B, T - 1)` of the completion, from the full logits of a plain forward (position
    t scores token t + 1), zero elsewhere; and the float mask of the completion positions. Differentiable."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    logps = logits.log_softmax(-1).gather(-1, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
    mask = batch["completion_mask"][:, 1:].float()
    return logps * mask, mask


def naive_alol_loss(logps, ref_logps, mask, advantages, loss_type, clip_epsilon, kl_coef) -> torch.Tensor:
    """The batch loss as DESIGN.md states it, one row at a time; `ref_logps` per token `(B, T)`, or for the
    sequence-level variants the sequence log-probabilities `(B,)`."""
    low, high = 1 - clip_epsilon, 1 + clip_epsilon
    rows = []
    for b in range(logps.shape[0]):
        tokens = mask[b].bool()
        lp, a_plus = logps[b][tokens], max(float(advantages[b]), 0.0)
        ref = ref_logps[b] if ref_logps.dim() == 1 else ref_logps[b][tokens]  # summed below either way
        nll = -lp.sum()
        if loss_type == "alol":
            weight = min(max(math.exp(float(lp.detach().sum() - ref.sum())), low), high)
            rows.append(a_plus * weight * nll)
        elif loss_type == "alol_seq":
            weights = torch.tensor([min(max(math.exp(float(d)), low), high) for d in (lp.detach() - ref)])
            rows.append(a_plus * (weights * -lp).sum())
        elif loss_type == "alol_ref_free":
            rows.append(a_plus * nll)
        else:  # alol_kl, on the rows A-LoL trains on
            rows.append(a_plus * nll + (kl_coef * (lp.sum() - ref.sum()) if advantages[b] > 0 else 0.0))
    return torch.stack(rows).mean()


def reference_logps(batch) -> torch.Tensor:
    """What the trainer stored of the reference: per token `(B, T - 1)` for "alol_seq", else per sequence `(B,)`."""
    return batch["ref_logps"] if "ref_logps" in batch else batch["ref_logp"]


def assert_reference_is(batch, token_logps, mask) -> None:
    """The stored reference log-probabilities equal `token_logps` (per token, or their sums over the completion)."""
    if "ref_logps" in batch:
        torch.testing.assert_close(
            batch["ref_logps"], token_logps.detach().to(batch["ref_logps"].dtype), rtol=0, atol=1e-5
        )
    else:
        sums = (token_logps.detach() * mask).sum(-1).to(batch["ref_logp"].dtype)
        torch.testing.assert_close(batch["ref_logp"], sums, rtol=0, atol=1e-4)


def _value(trainer, prompt_ids: list[int]) -> float:
    """V_ref(x) of one prompt from the Llama body's last hidden states and the trainer's fitted head."""
    with torch.no_grad():
        hidden = trainer.model.model(input_ids=torch.tensor([prompt_ids])).last_hidden_state
        return trainer.value_head(hidden, torch.ones(1, len(prompt_ids), dtype=torch.long)).item()


# -- end to end -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", VARIANTS)
def test_training_changes_every_parameter_and_logs_metrics(tmp_path, tiny_model_path, loss_type):
    dataset = make_scored_dataset("conversational_prompt_completion", 16)
    trainer = ALoLTrainer(tiny_model_path, args=_config(tmp_path, loss_type=loss_type), train_dataset=dataset)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    for name, param in trainer.model.named_parameters():
        assert not torch.equal(param, before[name]), f"{name} did not change"

    # What was measured before training is logged as step 0
    step0 = trainer.state.log_history[0]
    assert step0["step"] == 0
    for key in ("value/train_mse", "value/val_mse", "value/explained_variance", "value/num_prompts"):
        assert math.isfinite(step0[key]), key
    assert step0["value/num_prompts"] == 8
    assert step0["advantage/positive_fraction"] == len(trainer.train_dataset) / len(dataset)
    assert 0 < step0["advantage/positive_fraction"] < 1

    steps = [log for log in trainer.state.log_history if "loss" in log]
    assert [log["step"] for log in steps] == [1, 2, 3]
    weighted = {"importance_weight/mean", "importance_weight/clip_fraction"}
    for log in steps:
        for key in ("advantage/mean", "nll", "kl", "reward/mean", "value/mean"):
            assert key in log, key
        assert weighted <= log.keys() if loss_type in WEIGHTED else not weighted & log.keys()
        assert log["advantage/mean"] > 0  # only rows that beat the reference are trained on
        assert log["reward/mean"] - log["value/mean"] == pytest.approx(log["advantage/mean"], abs=1e-5)
    # The first step sees the reference itself; after it the policy has moved away
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-4)
    assert abs(steps[-1]["kl"]) > 1e-3
    if loss_type in WEIGHTED:
        assert steps[0]["importance_weight/mean"] == pytest.approx(1.0, abs=1e-4)
        assert steps[0]["importance_weight/clip_fraction"] == 0.0


# -- the loss against an independent computation ----------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", VARIANTS)
@pytest.mark.parametrize("model_fixture", ["tiny_model_path", "tiny_tied_model_path"])
def test_loss_at_initialisation_matches_naive_full_logits_computation(tmp_path, request, model_fixture, loss_type):
    args = _config(tmp_path, loss_type=loss_type, clip_epsilon=0.2, kl_coef=0.3)
    trainer = ALoLTrainer(
        request.getfixturevalue(model_fixture), args=args, train_dataset=make_scored_dataset("prompt_completion", 16)
    )
    batch = first_batch(trainer)
    logps, mask = naive_token_logps(trainer.model, batch)
    # Before training the policy is the reference: the stored reference log-probabilities are the policy's, in place
    assert ("ref_logps" in batch) == (loss_type == "alol_seq")  # per token only where the variant needs them
    assert_reference_is(batch, logps, mask)

    loss = trainer.compute_loss(trainer.model, batch)
    expected = naive_alol_loss(logps, reference_logps(batch), mask, batch["advantage"], loss_type, 0.2, 0.3)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    # Every weight is 1 and every KL term 0: all variants reduce to mean(A+ * NLL)
    plain = (batch["advantage"].clamp(min=0) * -(logps * mask).sum(-1)).mean()
    torch.testing.assert_close(loss, plain, rtol=1e-5, atol=1e-5)

    parameters = [p for p in trainer.model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, parameters, allow_unused=True)
    expected_grads = torch.autograd.grad(expected, parameters, allow_unused=True)
    for got, want in zip(grads, expected_grads):
        if want is None:
            assert got is None or torch.count_nonzero(got) == 0
        else:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss_type", VARIANTS)
def test_loss_after_the_policy_moved_matches_naive_computation(tmp_path, tiny_model_path, loss_type):
    # Once the policy differs from the reference, the importance weights, their clipping and the KL term matter
    args = _config(tmp_path, loss_type=loss_type, clip_epsilon=0.1, kl_coef=0.3)
    trainer = ALoLTrainer(tiny_model_path, args=args, train_dataset=make_scored_dataset("prompt_completion", 16))
    batch = first_batch(trainer)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        head = trainer.model.lm_head.weight
        head.add_(0.1 * torch.randn(head.shape, generator=generator))
    logps, mask = naive_token_logps(trainer.model, batch)
    log_ratio = (logps.detach() * mask).sum(-1) - batch["ref_logp"]  # (B,)
    assert log_ratio.abs().max() > 0.2  # far enough to clip some weights at 1 +- 0.1

    trainer.model.train()  # metrics go to the mode of the model
    trainer._metric_totals["train"].clear()
    loss = trainer.compute_loss(trainer.model, batch)
    expected = naive_alol_loss(logps, reference_logps(batch), mask, batch["advantage"], loss_type, 0.1, 0.3)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    parameters = list(trainer.model.parameters())
    for got, want in zip(torch.autograd.grad(loss, parameters), torch.autograd.grad(expected, parameters)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)

    metrics = {}
    trainer.log(metrics)  # the totals since the last log: this one batch
    assert metrics["kl"] == pytest.approx(log_ratio.mean().item(), abs=1e-5)
    assert metrics["nll"] == pytest.approx(-(logps * mask).sum(-1).mean().item(), rel=1e-5)
    if loss_type == "alol":
        ratio = log_ratio.exp()
        assert metrics["importance_weight/mean"] == pytest.approx(ratio.clamp(0.9, 1.1).mean().item(), abs=1e-5)
        assert metrics["importance_weight/clip_fraction"] == ((ratio < 0.9) | (ratio > 1.1)).float().mean().item()
        assert metrics["importance_weight/clip_fraction"] > 0


# -- which rows are trained on ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("priority_sampling", [False, True])
def test_only_rows_with_positive_advantage_are_trained_on(tmp_path, tiny_model_path, priority_sampling):
    dataset = make_scored_dataset("prompt_completion", 24)
    args = _config(tmp_path, priority_sampling=priority_sampling, max_steps=-1, num_train_epochs=1)
    trainer = ALoLTrainer(tiny_model_path, args=args, train_dataset=dataset)
    train = trainer.train_dataset
    tokenizer = trainer.processing_class

    # Recompute A = R - V_ref(x) for every row of the data, from the fitted head on a plain forward of the prompt
    advantages = [row["reward"] - _value(trainer, tokenizer(row["prompt"])["input_ids"]) for row in dataset]
    positive = Counter((r["prompt"], r["completion"]) for r, a in zip(dataset, advantages) if a > 0)
    assert 0 < sum(positive.values()) < len(dataset)
    assert Counter(zip(train["prompt"], train["completion"])) == positive
    assert all(a > 0 for a in train["advantage"])
    for row in train:
        assert row["value"] == pytest.approx(_value(trainer, row["prompt_ids"]), abs=1e-5)
        assert row["advantage"] == pytest.approx(row["reward"] - row["value"], abs=1e-9)
    assert trainer.precompute_metrics["advantage/positive_fraction"] == len(train) / len(dataset)

    # An epoch draws as many rows as there are positive ones, all of them positive; without priority sampling,
    # each exactly once
    drawn = torch.cat([batch["advantage"] for batch in trainer.get_train_dataloader()])
    assert len(drawn) == len(train) and bool((drawn > 0).all())
    if not priority_sampling:
        torch.testing.assert_close(drawn.sort().values, torch.tensor(sorted(train["advantage"])).float())
    trainer.train()
    assert trainer.state.global_step == math.ceil(len(train) / 4)


def test_dataset_where_no_row_beats_the_value_is_refused(tmp_path, tiny_model_path):
    # Equal rewards: the value head predicts them exactly, so A = 0 on every row and nothing is left to learn from
    dataset = make_scored_dataset("prompt_completion", 8).map(lambda row: {"reward": 0.5})
    with pytest.raises(ValueError, match="No row has a positive advantage"):
        ALoLTrainer(tiny_model_path, args=_config(tmp_path), train_dataset=dataset)


# -- rewards ----------------------------------------------------------------------------------------------------------


def _letters(prompts, completions, **kwargs):
    return [float(sum(ch in "abcdefgh" for ch in c)) for c in completions]


def test_sort_reward_func_fills_the_reward_column(tmp_path, tiny_model_path):
    dataset = make_scored_dataset("conversational_prompt_completion", 16, score="none")
    trainer = ALoLTrainer(
        tiny_model_path,
        args=_config(tmp_path),
        train_dataset=dataset,
        eval_dataset=dataset,  # every row, scored the same way
        reward_funcs=sort_reward_func,
    )
    expected = sort_reward_func(prompts=dataset["prompt"], completions=dataset["completion"])
    assert trainer.eval_dataset["reward"] == pytest.approx(expected, abs=1e-12)
    assert len(set(expected)) > 1
    for row in trainer.train_dataset:
        assert row["reward"] == sort_reward_func(prompts=[row["prompt"]], completions=[row["completion"]])[0]

    # The value targets are the rewards of the reference's own greedy answers (at most 4 new tokens), not the data's
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    answers = greedy_completions(model, trainer.processing_class, dataset["prompt"], max_new_tokens=4)
    greedy = sort_reward_func(prompts=dataset["prompt"], completions=answers)
    target_mean = trainer.precompute_metrics["value/target_mean"]
    assert min(greedy) - 1e-6 <= target_mean <= max(greedy) + 1e-6
    assert target_mean != pytest.approx(sum(expected) / len(expected), abs=1e-3)
    trainer.train()


def test_plain_function_with_extra_columns_fills_the_reward_column(tmp_path, tiny_model_path):
    dataset = make_scored_dataset("prompt_completion", 16, score="none")
    dataset = dataset.add_column("bonus", [float(i % 3) for i in range(len(dataset))])
    seen_columns = []

    def letters_plus_bonus(prompts, completions, bonus, **kwargs):
        seen_columns.append(set(kwargs))
        return [len(c) + b for c, b in zip(completions, bonus)]

    trainer = ALoLTrainer(
        tiny_model_path,
        args=_config(tmp_path),
        train_dataset=dataset,
        eval_dataset=dataset,
        reward_funcs=letters_plus_bonus,
    )
    expected = [len(c) + b for c, b in zip(dataset["completion"], dataset["bonus"])]
    assert trainer.eval_dataset["reward"] == expected
    assert all(row["reward"] == len(row["completion"]) + row["bonus"] for row in trainer.train_dataset)
    # Nothing that describes a completion other than the one scored leaks into the function's arguments
    assert seen_columns and all(not {"reward", "ref_logps", "advantage"} & columns for columns in seen_columns)
    trainer.train()


def test_weighted_reward_funcs_replace_labels(tmp_path, tiny_model_path):
    # Rows with a KTO label: with `reward_funcs`, the functions decide the reward, not the label
    dataset = make_scored_dataset("prompt_completion", 16, score="label")
    trainer = ALoLTrainer(
        tiny_model_path,
        args=_config(tmp_path, reward_weights=[2.0, 0.5]),
        train_dataset=dataset,
        eval_dataset=dataset,
        reward_funcs=[sort_reward_func, lambda prompts, completions, **kwargs: _letters(prompts, completions)],
    )
    sort = sort_reward_func(prompts=dataset["prompt"], completions=dataset["completion"])
    letters = _letters(dataset["prompt"], dataset["completion"])
    expected = [2.0 * s + 0.5 * n for s, n in zip(sort, letters)]
    assert trainer.eval_dataset["reward"] == pytest.approx(expected, abs=1e-12)
    assert trainer.eval_dataset["reward"] != [float(label) for label in dataset["label"]]
    trainer.train()


# -- data formats -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset_format", ["prompt_completion", "conversational_prompt_completion"])
def test_label_rows_get_reward_one_or_zero(tmp_path, tiny_model_path, dataset_format):
    dataset = make_scored_dataset(dataset_format, 16, score="label")
    trainer = ALoLTrainer(tiny_model_path, args=_config(tmp_path), train_dataset=dataset, eval_dataset=dataset)
    assert trainer.eval_dataset["reward"] == [1.0 if label else 0.0 for label in dataset["label"]]
    assert set(trainer.eval_dataset["reward"]) == {0.0, 1.0}
    trainer.train()


def test_integer_rewards_are_read_as_floats(tmp_path, tiny_model_path):
    dataset = make_scored_dataset("prompt_completion", 16).map(lambda row: {"reward": int(row["reward"] * 4)})
    trainer = ALoLTrainer(tiny_model_path, args=_config(tmp_path), train_dataset=dataset, eval_dataset=dataset)
    assert trainer.eval_dataset["reward"] == [float(r) for r in dataset["reward"]]
    assert trainer.eval_dataset.features["reward"].dtype == "float64"


PAIRS = [("cab", "abc"), ("dbca", "abcd"), ("hgfe", "efgh"), ("bad", "abd"), ("fedc", "cdef"), ("gha", "agh")]


def test_preference_rows_are_unpaired(tmp_path, tiny_model_path):
    dataset = Dataset.from_list([{"prompt": f"{p}=", "chosen": s, "rejected": s[::-1]} for p, s in PAIRS])
    trainer = ALoLTrainer(tiny_model_path, args=_config(tmp_path), train_dataset=dataset, eval_dataset=dataset)
    unpaired = Counter(
        zip(trainer.eval_dataset["prompt"], trainer.eval_dataset["completion"], trainer.eval_dataset["reward"])
    )
    expected = Counter([(f"{p}=", s, 1.0) for p, s in PAIRS] + [(f"{p}=", s[::-1], 0.0) for p, s in PAIRS])
    assert unpaired == expected
    assert set(zip(trainer.train_dataset["prompt"], trainer.train_dataset["completion"])) <= {
        (p, c) for p, c, _ in expected
    }
    trainer.train()


def test_conversational_preference_rows_with_an_implicit_prompt_are_unpaired(tmp_path, tiny_model_path):
    def turn(role, content):
        return {"role": role, "content": content}

    rows = [
        {"chosen": [turn("user", p), turn("assistant", s)], "rejected": [turn("user", p), turn("assistant", s[::-1])]}
        for p, s in PAIRS
    ]
    trainer = ALoLTrainer(
        tiny_model_path,
        args=_config(tmp_path),
        train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list(rows),
    )
    unpaired = trainer.eval_dataset
    assert len(unpaired) == 2 * len(PAIRS)
    got = Counter(
        (prompt[-1]["content"], completion[-1]["content"], reward)
        for prompt, completion, reward in zip(unpaired["prompt"], unpaired["completion"], unpaired["reward"])
    )
    assert got == Counter([(p, s, 1.0) for p, s in PAIRS] + [(p, s[::-1], 0.0) for p, s in PAIRS])
    assert all(len(prompt) == 1 and prompt[0]["role"] == "user" for prompt in unpaired["prompt"])


# -- PEFT -------------------------------------------------------------------------------------------------------------


def test_peft_trains_only_the_adapters(tmp_path, tiny_model_path):
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = ALoLTrainer(
        tiny_model_path,
        args=_config(tmp_path),
        train_dataset=make_scored_dataset("prompt_completion", 16),
        peft_config=peft_config,
    )
    # The reference is the base model (adapters disabled): its log-probabilities are the base model's
    batch = first_batch(trainer)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    with torch.no_grad():
        base_logps, mask = naive_token_logps(base, batch)
    assert_reference_is(batch, base_logps, mask)

    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])}
    adapters = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in name for name in adapters)
    # Every lora_B starts at zero and must move; nothing outside the adapters may move
    assert {name for name in adapters if "lora_B" in name} <= changed
    assert changed <= adapters
    for name, param in base.named_parameters():
        peft_name = "base_model.model." + name.replace("q_proj.", "q_proj.base_layer.").replace(
            "v_proj.", "v_proj.base_layer."
        )
        assert torch.equal(dict(trainer.model.named_parameters())[peft_name], param), name


# -- bad input is refused before training -----------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")


def _rows(*rewards, **columns):
    return [{"prompt": f"{p}=", "completion": s, "reward": r, **columns} for (p, s), r in zip(PAIRS, rewards)]


@pytest.mark.parametrize(
    "rows,kwargs,error,message",
    [
        ([{"prompt": "ab=", "reward": 1.0}], {}, ValueError, r"missing \['completion'\]"),
        (
            [{"prompt": "ab=", "completion": "ab"}],
            {},
            ValueError,
            "no 'reward' or 'label' column, and no `reward_funcs`",
        ),
        (_rows("high", "low"), {}, TypeError, "Row 0 of column 'reward' must be a number, got str"),
        (_rows(True, False), {}, TypeError, "Row 0 of column 'reward' must be a number, got bool"),
        (_rows(1.0, NAN), {}, ValueError, r"Row 1 of column 'reward' is not finite \(nan\)"),
        (_rows(1.0, 0.0, -INF), {}, ValueError, r"Row 2 of column 'reward' is not finite \(-inf\)"),
        (
            [{"prompt": "ab=", "completion": "ab", "reward": 1.0}, {"prompt": "ba=", "completion": "", "reward": 0.0}],
            {},
            ValueError,
            "Row 1 of column 'completion' is an empty string",
        ),
        (
            [{"prompt": "ab=", "completion": "ab", "label": "yes"}],
            {},
            TypeError,
            "Row 0 of column 'label' must be a bool, got str",
        ),
        (_rows(1.0, 0.0), {"reward_funcs": sort_reward_func}, ValueError, "has a 'reward' column and `reward_funcs`"),
        (
            [{"prompt": f"{p}=", "completion": s} for p, s in PAIRS],
            {"reward_funcs": lambda prompts, completions, **kw: [1.0, NAN] + [0.0] * (len(prompts) - 2)},
            ValueError,
            r"non-finite reward \(nan\) for row 1",
        ),
        ([{"prompt": "ab=", "chosen": "ab"}], {}, ValueError, "only one of 'chosen' and 'rejected'"),
    ],
)
def test_bad_datasets_are_refused(tmp_path, tiny_model_path, rows, kwargs, error, message):
    with pytest.raises(error, match=message):
        ALoLTrainer(tiny_model_path, args=_config(tmp_path), train_dataset=Dataset.from_list(rows), **kwargs)


def test_prompts_too_long_for_max_length_are_dropped_with_a_warning(tmp_path, tiny_model_path, caplog):
    rows = [
        {"prompt": "ab=", "completion": "ab", "reward": 1.0},
        {"prompt": "abcdefg=", "completion": "abcdefg", "reward": 0.0},
        {"prompt": "abc=", "completion": "abc", "reward": 0.5},
        {"prompt": "hgfedcb=", "completion": "bcdefgh", "reward": 0.2},
    ]
    trainer = ALoLTrainer(
        tiny_model_path,
        args=_config(tmp_path, max_length=6),
        train_dataset=Dataset.from_list(rows[::2]),
        eval_dataset=Dataset.from_list(rows),
    )
    assert "Dropped 2 of the 4 rows of the eval dataset (rows [1, 3])" in caplog.text and "max_length=6" in caplog.text
    assert trainer.eval_dataset["reward"] == [1.0, 0.5]  # as KTOTrainer filters them
    with pytest.raises(ValueError, match=r"Every row of the train dataset \(2\).*`max_length=6`"):
        ALoLTrainer(tiny_model_path, args=_config(tmp_path, max_length=6), train_dataset=Dataset.from_list(rows[1::2]))


def test_iterable_datasets_are_refused(tmp_path, tiny_model_path):
    dataset = make_scored_dataset("prompt_completion", 8)
    with pytest.raises(
        TypeError, match="The train dataset is an IterableDataset .streaming., which A-LoL cannot take"
    ):
        ALoLTrainer(tiny_model_path, args=_config(tmp_path), train_dataset=dataset.to_iterable_dataset())
    with pytest.raises(TypeError, match="The eval dataset is an IterableDataset"):
        ALoLTrainer(
            tiny_model_path,
            args=_config(tmp_path),
            train_dataset=dataset,
            eval_dataset=dataset.to_iterable_dataset(),
        )


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(loss_type="bogus"), "`loss_type` must be one of"),
        (dict(clip_epsilon=1.5), "`clip_epsilon` must be in"),
        (dict(clip_epsilon=-0.1), "`clip_epsilon` must be in"),
        (dict(loss_type="alol_kl", kl_coef=0.0), "needs `kl_coef > 0`"),
        (dict(kl_coef=-1.0), "`kl_coef` must be >= 0"),
        (dict(max_length=1), "`max_length` must be at least 2"),
        (dict(value_num_prompts=0), "`value_num_prompts` must be >= 1"),
        (dict(value_validation_fraction=1.0), "`value_validation_fraction` must be in"),
    ],
)
def test_bad_config_values_are_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, **overrides)


# -- caching, saving, evaluation --------------------------------------------------------------------------------------


def test_reference_passes_are_cached_beside_a_file_backed_dataset(tmp_path, tiny_model_path):
    make_scored_dataset("prompt_completion", 16).to_json(str(tmp_path / "data.json"))
    cache_dir = tmp_path / "cache"
    dataset = load_dataset("json", data_files=str(tmp_path / "data.json"), split="train", cache_dir=str(cache_dir))
    first = ALoLTrainer(tiny_model_path, args=_config(tmp_path / "a"), train_dataset=dataset)

    states = glob.glob(str(cache_dir / "**" / "*.arrow.state"), recursive=True)
    assert len(states) == 1
    cache_file = states[0].removesuffix(".state")
    assert os.path.isfile(cache_file) and os.path.isfile(cache_file + ".json")
    with open(cache_file + ".json") as f:
        stored = json.load(f)
    assert stored == {k: v for k, v in first.precompute_metrics.items() if k != "advantage/positive_fraction"}
    # Mark the cached metrics: a trainer that reads them back shows the mark, one that recomputes does not
    with open(cache_file + ".json", "w") as f:
        json.dump({**stored, "cache/mark": 1.0}, f)

    second = ALoLTrainer(tiny_model_path, args=_config(tmp_path / "b"), train_dataset=dataset)
    assert second.precompute_metrics == {**first.precompute_metrics, "cache/mark": 1.0}
    for column in ("prompt", "completion", "reward", "ref_logp", "value", "advantage"):
        assert second.train_dataset[column] == first.train_dataset[column], column
    first_head, second_head = first.value_head.state_dict(), second.value_head.state_dict()
    assert all(torch.equal(first_head[k].cpu(), second_head[k].cpu()) for k in first_head)
    second.train()

    # Other value settings or another model are not served from that cache
    third = ALoLTrainer(tiny_model_path, args=_config(tmp_path / "c", value_num_epochs=3), train_dataset=dataset)
    assert "cache/mark" not in third.precompute_metrics
    other = build_tiny_model(str(tmp_path / "other"), seed=1)
    fourth = ALoLTrainer(other, args=_config(tmp_path / "d"), train_dataset=dataset)
    assert "cache/mark" not in fourth.precompute_metrics
    assert fourth.train_dataset["ref_logp"] != first.train_dataset["ref_logp"]
    # The same checkpoint with other weights (same name, same tokenizer) is another model too
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    changed = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    with torch.no_grad():
        changed.lm_head.weight.mul_(1.5)
    fifth = ALoLTrainer(changed, args=_config(tmp_path / "e"), train_dataset=dataset, processing_class=tokenizer)
    assert "cache/mark" not in fifth.precompute_metrics
    # ... while the same weights, loaded by the user, are served from the cache
    same = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    sixth = ALoLTrainer(same, args=_config(tmp_path / "f"), train_dataset=dataset, processing_class=tokenizer)
    assert sixth.precompute_metrics["cache/mark"] == 1.0
    assert len(glob.glob(str(cache_dir / "**" / "*.arrow.state"), recursive=True)) == 4


def test_save_model_writes_a_model_card_and_a_loadable_model(tmp_path, tiny_model_path):
    trainer = ALoLTrainer(
        tiny_model_path, args=_config(tmp_path / "out"), train_dataset=make_scored_dataset("prompt_completion", 16)
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    card = (tmp_path / "saved" / "README.md").read_text()
    assert "A-LoL" in card and "2305.14718" in card and "baheti2024leftover" in card
    assert "alol" in card and "trl-offline" in card  # the tags
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved"))
    trained = dict(trainer.model.named_parameters())
    for name, param in loaded.named_parameters():
        assert torch.equal(param, trained[name]), name


def test_evaluation_scores_every_row_and_logs_the_metrics(tmp_path, tiny_model_path):
    eval_dataset = make_scored_dataset("prompt_completion", 8, seed=3)
    trainer = ALoLTrainer(
        tiny_model_path,
        args=_config(tmp_path),
        train_dataset=make_scored_dataset("prompt_completion", 16),
        eval_dataset=eval_dataset,
    )
    scored = trainer.eval_dataset
    assert len(scored) == len(eval_dataset)  # rows with A <= 0 are evaluated too, with a zero loss
    assert any(a <= 0 for a in scored["advantage"]) and any(a > 0 for a in scored["advantage"])
    for row in scored:
        assert row["value"] == pytest.approx(_value(trainer, row["prompt_ids"]), abs=1e-5)

    # Two full batches of 4: eval_loss is the mean over all rows of A+ * NLL (the policy is the reference)
    batch = trainer.data_collator(list(scored))
    with torch.no_grad():
        logps, mask = naive_token_logps(trainer.model, batch)
    expected_loss = (batch["advantage"].clamp(min=0) * -(logps * mask).sum(-1)).mean().item()

    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(expected_loss, rel=1e-5)
    logged = trainer.state.log_history[-1]
    assert logged["eval_advantage/mean"] == pytest.approx(sum(scored["advantage"]) / len(scored), abs=1e-6)
    assert logged["eval_reward/mean"] == pytest.approx(sum(scored["reward"]) / len(scored), abs=1e-6)
    assert logged["eval_importance_weight/mean"] == pytest.approx(1.0, abs=1e-5)
    # ... and `evaluate()` returns them, as every TRL trainer's does
    for key in ("eval_advantage/mean", "eval_reward/mean", "eval_value/mean", "eval_nll", "eval_kl"):
        assert metrics.get(key) == logged[key], key


def test_evaluate_prepares_a_dataset_passed_to_it(tmp_path, tiny_model_path):
    # A raw dataset given to `evaluate()` is scored like one given at construction
    eval_dataset = make_scored_dataset("prompt_completion", 8, seed=3)
    train_dataset = make_scored_dataset("prompt_completion", 16)
    given = ALoLTrainer(
        tiny_model_path, args=_config(tmp_path / "a"), train_dataset=train_dataset, eval_dataset=eval_dataset
    )
    passed = ALoLTrainer(tiny_model_path, args=_config(tmp_path / "b"), train_dataset=train_dataset)
    assert passed.evaluate(eval_dataset)["eval_loss"] == pytest.approx(given.evaluate()["eval_loss"], rel=1e-6)


def test_gradient_accumulation_gives_the_update_of_the_larger_batch(tmp_path, tiny_model_path):
    # The loss is a mean over sequences; with plain SGD the update is proportional to the gradient, so two
    # accumulated half batches must move the weights exactly as one full batch
    dataset = make_scored_dataset("prompt_completion", 16)
    common = dict(max_steps=1, optim="sgd", learning_rate=0.1)
    one_batch = ALoLTrainer(
        tiny_model_path, args=_config(tmp_path / "a", per_device_train_batch_size=4, **common), train_dataset=dataset
    )
    accumulated = ALoLTrainer(
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


# -- resuming ---------------------------------------------------------------------------------------------------------


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_resume_reuses_the_value_head_and_rows_of_the_run(tmp_path, pretrained_tiny_model_path):
    # An in-memory dataset: nothing is cached, so the resumed trainer computes its precompute again. Here the new fit
    # is made to differ (another value learning rate), as a fit on a GPU may in its last bits: the resume must go on
    # with the checkpoint's value head and rows, and end where the uninterrupted run ended
    dataset = make_scored_dataset("prompt_completion", 96, seed=3)
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, value_num_prompts=32, value_num_epochs=5)
    full = ALoLTrainer(pretrained_tiny_model_path, args=_config(tmp_path / "full", **common), train_dataset=dataset)
    full.train()
    saved = torch.load(tmp_path / "full" / "checkpoint-2" / "precompute_state.pt", weights_only=True)
    assert saved["positive_rows"].tolist() == full._positive_rows
    full.save_model()
    assert (tmp_path / "full" / "precompute_state.pt").is_file()  # beside the final model too

    args = _config(tmp_path / "resumed", **common, value_learning_rate=3e-2)
    resumed = ALoLTrainer(pretrained_tiny_model_path, args=args, train_dataset=dataset)
    assert resumed._positive_rows != full._positive_rows  # without the checkpoint's state, other rows
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert resumed._positive_rows == full._positive_rows
    assert resumed.train_dataset["advantage"] == pytest.approx(list(full.train_dataset["advantage"]), abs=1e-6)
    full_weights, resumed_weights = _weights(full.model), _weights(resumed.model)
    assert all(torch.equal(resumed_weights[name], weight) for name, weight in full_weights.items())


def test_resume_on_other_rows_keeps_what_was_computed_now(tmp_path, tiny_model_path, caplog):
    trainer = ALoLTrainer(
        tiny_model_path, args=_config(tmp_path), train_dataset=make_scored_dataset("prompt_completion", 16)
    )
    state = trainer.precompute_state()
    other = ALoLTrainer(
        tiny_model_path, args=_config(tmp_path), train_dataset=make_scored_dataset("prompt_completion", 16, seed=1)
    )
    rows = other._positive_rows
    other.load_precompute_state(state)
    assert "other training rows" in caplog.text and other._positive_rows == rows


def test_compute_metrics_gets_each_rows_log_probs_value_and_reward(tmp_path, tiny_model_path):
    seen = []

    def compute_metrics(prediction):
        seen.append(prediction)
        return {"mean_value": float(prediction.predictions[:, 2].mean())}

    eval_dataset = make_scored_dataset("prompt_completion", 7, seed=3)  # a short last batch of 3
    trainer = ALoLTrainer(
        tiny_model_path,
        args=_config(tmp_path),
        train_dataset=make_scored_dataset("prompt_completion", 16),
        eval_dataset=eval_dataset,
        compute_metrics=compute_metrics,
    )
    metrics = trainer.evaluate()
    (prediction,) = seen
    scored = trainer.eval_dataset
    assert ALoLTrainer.PREDICTION_COLUMNS == ("logp", "ref_logp", "value")
    assert prediction.predictions.shape == (7, 3)
    # Before training the policy is the reference: its log-probabilities are the precomputed ones
    assert prediction.predictions[:, 0] == pytest.approx(list(scored["ref_logp"]), abs=1e-4)
    assert prediction.predictions[:, 1] == pytest.approx(list(scored["ref_logp"]), abs=1e-6)
    assert prediction.predictions[:, 2] == pytest.approx(list(scored["value"]), abs=1e-6)
    assert prediction.label_ids == pytest.approx(list(eval_dataset["reward"]), abs=1e-6)
    assert metrics["eval_mean_value"] == pytest.approx(sum(scored["value"]) / 7, abs=1e-5)


def test_pad_to_multiple_of_pads_the_batches(tmp_path, tiny_model_path):
    args = _config(tmp_path, pad_to_multiple_of=16)
    trainer = ALoLTrainer(tiny_model_path, args=args, train_dataset=make_scored_dataset("prompt_completion", 16))
    batch = first_batch(trainer)
    assert batch["input_ids"].shape[1] % 16 == 0
    assert _config(tmp_path).pad_to_multiple_of is None  # KTO's default
