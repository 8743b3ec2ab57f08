"""What `OfflineRLTrainer` gives every trainer that learns from scored responses: the tokenization of
prompt + completion rows, the reference passes and the metric bookkeeping. The concrete trainer is `ALoLTrainer`, the
base class has no loss of its own."""

import pytest
import torch
from datasets import Dataset
from helpers import cpu_run_args
from transformers import AutoModelForCausalLM, TrainingArguments

from trl_offline import ALoLConfig, ALoLTrainer
from trl_offline.offline_kit import build_tiny_model, make_scored_dataset


def _config(tmp_path, **overrides) -> ALoLConfig:
    defaults = dict(
        max_steps=2,
        value_num_prompts=8,
        value_num_epochs=2,
        max_completion_length=4,
    )
    return ALoLConfig(**cpu_run_args(tmp_path, **{**defaults, **overrides}))


def _naive_token_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities `(B, T - 1)` from the full logits of a plain forward, position t scoring token
    t + 1, zero off the completion; and the completion mask of those positions."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double()
    logps = logits.log_softmax(-1).gather(-1, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
    mask = batch["completion_mask"][:, 1:].bool()
    return logps.masked_fill(~mask, 0.0), mask


# -- tokenization of the rows -----------------------------------------------------------------------------------------


def test_standard_rows_get_an_eos_and_split_at_the_prompt(tmp_path, tiny_model_path):
    dataset = make_scored_dataset("prompt_completion", 8)
    args = _config(tmp_path, loss_type="alol_seq")  # the variant that keeps per-token reference log-probabilities
    trainer = ALoLTrainer(tiny_model_path, args=args, train_dataset=dataset, eval_dataset=dataset)
    tokenizer = trainer.processing_class
    prepared = trainer.eval_dataset  # every row, in order
    for row, original in zip(prepared, dataset):
        assert tokenizer.decode(row["prompt_ids"]) == original["prompt"]
        assert tokenizer.decode(row["completion_ids"]) == original["completion"] + tokenizer.eos_token
        # One reference log-probability per completion token, each a log-probability, and their sum
        assert len(row["ref_logps"]) == len(row["completion_ids"])
        assert all(lp < 0 for lp in row["ref_logps"])
        assert row["ref_logp"] == pytest.approx(sum(row["ref_logps"]), abs=1e-5)
    # The other variants keep only the sum
    sequence_level = ALoLTrainer(tiny_model_path, args=_config(tmp_path), train_dataset=dataset, eval_dataset=dataset)
    assert "ref_logps" not in sequence_level.eval_dataset.column_names
    assert sequence_level.eval_dataset["ref_logp"] == pytest.approx(prepared["ref_logp"], abs=1e-5)


def test_conversational_rows_split_after_the_generation_prompt(tmp_path, tiny_model_path):
    dataset = make_scored_dataset("conversational_prompt_completion", 8)
    trainer = ALoLTrainer(tiny_model_path, args=_config(tmp_path), train_dataset=dataset, eval_dataset=dataset)
    tokenizer = trainer.processing_class
    for row, original in zip(trainer.eval_dataset, dataset):
        user = original["prompt"][0]["content"]
        answer = original["completion"][0]["content"]
        assert tokenizer.decode(row["prompt_ids"]) == f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        assert tokenizer.decode(row["completion_ids"]) == f"{answer}<|im_end|>\n"


def test_completions_are_truncated_to_max_length(tmp_path, tiny_model_path):
    # Prompts of 4 to 7 characters ("abc=" .. "abcdef="), so max_length=9 cuts most completions
    dataset = make_scored_dataset("prompt_completion", 12)
    trainer = ALoLTrainer(
        tiny_model_path,
        args=_config(tmp_path, max_length=9, loss_type="alol_seq"),
        train_dataset=dataset,
        eval_dataset=dataset,
    )
    tokenizer = trainer.processing_class
    truncated = 0
    for row, original in zip(trainer.eval_dataset, dataset):
        full = tokenizer(original["prompt"] + original["completion"] + tokenizer.eos_token)["input_ids"]
        expected = full[len(row["prompt_ids"]) : 9]
        assert row["completion_ids"] == expected
        assert len(row["ref_logps"]) == len(expected) >= 1
        truncated += len(full) > 9
    assert truncated > 0
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert batch["input_ids"].shape[1] <= 9


# -- the reference passes ---------------------------------------------------------------------------------------------


def test_separate_ref_model_scores_the_rows(tmp_path, tiny_model_path):
    ref_path = build_tiny_model(str(tmp_path / "ref"), seed=1)
    ref_model = AutoModelForCausalLM.from_pretrained(ref_path)
    trainer = ALoLTrainer(
        tiny_model_path,
        ref_model=ref_model,
        args=_config(tmp_path / "out", loss_type="alol_seq"),
        train_dataset=make_scored_dataset("prompt_completion", 16),
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    ref_logps, mask = _naive_token_logps(AutoModelForCausalLM.from_pretrained(ref_path), batch)
    policy_logps, _ = _naive_token_logps(trainer.model, batch)
    torch.testing.assert_close(batch["ref_logps"].double(), ref_logps, rtol=0, atol=1e-5)
    # The policy is another model: its log-probabilities are not the reference's
    assert (policy_logps - ref_logps)[mask].abs().max() > 1e-2
    # The reference is frozen through training, the policy is not
    ref_before = {n: p.detach().clone() for n, p in trainer.ref_model.named_parameters()}
    trainer.train()
    assert all(torch.equal(p, ref_before[n]) for n, p in trainer.ref_model.named_parameters())


def test_model_cannot_be_its_own_ref_model(tmp_path, tiny_model_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    with pytest.raises(ValueError, match="cannot be the same object"):
        ALoLTrainer(
            model, ref_model=model, args=_config(tmp_path), train_dataset=make_scored_dataset("prompt_completion", 8)
        )


def test_reference_is_gone_once_training_has_started(tmp_path, tiny_model_path):
    trainer = ALoLTrainer(
        tiny_model_path, args=_config(tmp_path), train_dataset=make_scored_dataset("prompt_completion", 16)
    )
    trainer.model.train()
    with trainer.reference_model() as model:
        assert model is trainer.model and not model.training
        assert not torch.is_grad_enabled()
    assert trainer.model.training  # restored
    trainer.train()
    with pytest.raises(RuntimeError, match="gone once training has started"):
        with trainer.reference_model():
            pass


def test_map_rows_keeps_order_and_batches(tmp_path, tiny_model_path):
    trainer = ALoLTrainer(
        tiny_model_path, args=_config(tmp_path), train_dataset=make_scored_dataset("prompt_completion", 8)
    )
    calls = []

    def fn(indices):
        calls.append(list(indices))
        return {
            "float": torch.tensor([10.0 * i for i in indices]),  # (b,)
            "ragged": [torch.arange(i + 1, dtype=torch.float32) for i in indices],  # one length per row
            "text": [f"row {i}" for i in indices],
        }

    out = trainer.map_rows(7, fn, batch_size=3, desc="test")
    assert calls == [[0, 1, 2], [3, 4, 5], [6]]
    assert out["float"] == [0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0]
    assert out["ragged"] == [list(map(float, range(i + 1))) for i in range(7)]
    assert out["text"] == [f"row {i}" for i in range(7)]


def test_map_rows_raises_what_fn_raised(tmp_path, tiny_model_path):
    trainer = ALoLTrainer(
        tiny_model_path, args=_config(tmp_path), train_dataset=make_scored_dataset("prompt_completion", 8)
    )

    def fn(indices):
        if 4 in indices:
            raise ValueError("row 4 is bad")
        return {"x": torch.zeros(len(indices))}

    with pytest.raises(ValueError, match="row 4 is bad"):
        trainer.map_rows(7, fn, batch_size=2, desc="test")
    with pytest.raises(ValueError, match="has no rows"):
        trainer.map_rows(0, fn, batch_size=2, desc="test")


def test_cached_columns_do_not_cache_in_memory_datasets(tmp_path, tiny_model_path):
    trainer = ALoLTrainer(
        tiny_model_path, args=_config(tmp_path), train_dataset=make_scored_dataset("prompt_completion", 8)
    )
    dataset = Dataset.from_dict({"x": [1, 2, 3]})
    calls = []

    def compute():
        calls.append(1)
        return {"y": [4.0, 5.0, 6.0], "x": [7, 8, 9]}

    for _ in range(2):
        out = trainer.cached_columns(dataset, "some-fingerprint", compute)
        # A computed column replaces one of the same name
        assert sorted(out.column_names) == ["x", "y"] and out["x"] == [7, 8, 9] and out["y"] == [4.0, 5.0, 6.0]
    assert len(calls) == 2


def test_row_metrics_are_averaged_over_rows_not_batches(tmp_path, tiny_model_path):
    trainer = ALoLTrainer(
        tiny_model_path, args=_config(tmp_path), train_dataset=make_scored_dataset("prompt_completion", 8)
    )
    trainer.model.train()  # the mode `log` reports
    trainer._metric_totals["train"].clear()
    # A full batch of 4 rows and a short one of 1: the mean is over the 5 rows, (1 + 2 + 3 + 4 + 10) / 5 = 4
    trainer.log_row_metrics("train", {"rows": torch.ones(4), "a": torch.tensor([1.0, 2, 3, 4])}, {"a": "rows"})
    trainer.log_row_metrics("train", {"rows": torch.ones(1), "a": torch.tensor([10.0])}, {"a": "rows"})
    # "b" is divided by a total of zero: it is left out rather than divided by zero
    trainer.log_row_metrics("train", {"none": torch.zeros(2), "b": torch.ones(2)}, {"b": "none"})
    logs = {}
    trainer.log(logs)
    assert logs["a"] == 4.0 and "b" not in logs
    assert not trainer._metric_totals["train"]  # the next log starts afresh


def test_plain_training_arguments_are_converted(tmp_path, tiny_model_path):
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", gradient_checkpointing=False, max_steps=1
    )
    trainer = ALoLTrainer(tiny_model_path, args=args, train_dataset=make_scored_dataset("prompt_completion", 8))
    assert isinstance(trainer.args, ALoLConfig)
    assert trainer.args.loss_type == "alol" and trainer.args.clip_epsilon == 0.9 and trainer.args.max_steps == 1


def test_an_empty_dataset_is_named_before_training(tmp_path, tiny_model_path):
    empty = Dataset.from_dict({"prompt": [], "completion": [], "reward": []})
    with pytest.raises(ValueError, match="The train dataset is empty"):
        ALoLTrainer(tiny_model_path, args=_config(tmp_path), train_dataset=empty)
    full = make_scored_dataset("prompt_completion", 8)
    with pytest.raises(ValueError, match="The extra dataset is empty"):
        ALoLTrainer(tiny_model_path, args=_config(tmp_path), train_dataset=full, eval_dataset={"extra": empty})


# -- Mixture-of-Experts -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("trainer_class", ["alol", "dro"])
def test_moe_load_balancing_loss_is_added_as_kto_adds_it(tmp_path, tiny_moe_model_path, trainer_class):
    from trl_offline import DROConfig, DROTrainer

    trainer_class, config_class = (ALoLTrainer, ALoLConfig) if trainer_class == "alol" else (DROTrainer, DROConfig)
    dataset = make_scored_dataset("prompt_completion", 16)
    settings = dict(max_steps=1, value_num_prompts=8, value_num_epochs=1) if config_class is ALoLConfig else {}
    trainer = trainer_class(
        tiny_moe_model_path, args=config_class(**cpu_run_args(tmp_path, **settings)), train_dataset=dataset
    )
    assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == 0.02  # the config's own coefficient
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
        # The load-balancing loss of the model's own forward, computed by transformers
        expected_aux = AutoModelForCausalLM.from_pretrained(tiny_moe_model_path)(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True
        ).aux_loss
        trainer.router_aux_loss_coef = 0.0
        without = trainer.compute_loss(trainer.model, batch)
    assert expected_aux > 0
    assert (loss - without).item() == pytest.approx(0.02 * expected_aux.item(), rel=1e-4)
    trainer.router_aux_loss_coef = 0.02
    trainer.train()  # and it trains with it, logging it
    logged = [log["aux_loss"] for log in trainer.state.log_history if "loss" in log]
    assert logged and all(aux > 0 for aux in logged)

    off = trainer_class(
        tiny_moe_model_path,
        args=config_class(**cpu_run_args(tmp_path / "off", router_aux_loss_coef=0.0, **settings)),
        train_dataset=dataset,
    )
    assert not off.aux_loss_enabled


def test_router_aux_loss_coef_on_a_dense_model_is_refused(tmp_path, tiny_model_path):
    with pytest.raises(ValueError, match="not a Mixture-of-Experts"):
        ALoLTrainer(
            tiny_model_path,
            args=_config(tmp_path, router_aux_loss_coef=0.01),
            train_dataset=make_scored_dataset("prompt_completion", 8),
        )
