"""What each of our trainers does with every argument a TRL user passes to the trainer it replaces.

For `ALoLTrainer` and `DROTrainer` that is `KTOTrainer` and `KTOConfig`; for `IQLearnTrainer`, `SFTTrainer` and
`SFTConfig`. Every field TRL's config adds to `TrainingArguments` (or whose default it changes) and every constructor
argument is classified: honoured (a test shows it does what it does in TRL), refused before training with an error
naming it, or not applicable (with the reason). `tests/test_parity.py` reads these fields from the installed TRL, so a
field a later TRL adds fails the test until it is classified here, and it checks that every test named here exists.

`docs/parity.md` is rendered from this file: `python tests/parity_table.py > docs/parity.md`.
"""

import dataclasses
import inspect


HONOURED, REFUSED, NOT_APPLICABLE = "honoured", "refused", "not applicable"
# The evidence of a refusal by absence: our config has no such field, so setting it is a `TypeError` naming it
NO_SUCH_FIELD = "no such field"


@dataclasses.dataclass(frozen=True)
class Row:
    status: str
    how: str  # one sentence, for the docs
    evidence: str = ""  # "tests/<file>.py::<test>", or NO_SUCH_FIELD for a refusal by absence


def honoured(how: str, evidence: str) -> Row:
    return Row(HONOURED, how, evidence)


def refused(how: str, evidence: str = NO_SUCH_FIELD) -> Row:
    return Row(REFUSED, how, evidence)


def not_applicable(how: str) -> Row:
    return Row(NOT_APPLICABLE, how)


ARGS = "tests/test_trl_arguments.py"
OFFLINE = "tests/test_offline_trainer.py"
ALOL = "tests/alol/test_alol_trainer.py"
DRO = "tests/dro/test_dro_trainer.py"
IQL = "tests/iqlearn/test_iqlearn_trainer.py"
QLORA = "tests/test_qlora.py"
TOKENIZATION = "tests/test_tokenization.py"

_NO_TR_DPO = (
    "the papers' objectives are regularised towards a fixed reference, and A-LoL's advantages and DRO's precomputed "
    "log-probabilities are computed once against it; TR-DPO's reference syncing is not part of either method"
)

# -- KTOConfig, for A-LoL and DRO -------------------------------------------------------------------------------------

_KTO_SHARED = {
    "model_init_kwargs": honoured(
        "`from_pretrained` keyword arguments of the model (and of models loaded beside it)",
        f"{ARGS}::test_model_init_kwargs_reach_from_pretrained",
    ),
    "trust_remote_code": honoured(
        "passed to `from_pretrained` for the model and the tokenizer",
        f"{ARGS}::test_trust_remote_code_loads_custom_code",
    ),
    "router_aux_loss_coef": honoured(
        "the Mixture-of-Experts load-balancing loss added as KTO adds it; an error on a dense model",
        f"{OFFLINE}::test_moe_load_balancing_loss_is_added_as_kto_adds_it",
    ),
    "disable_dropout": honoured("dropout off in the model and the reference", f"{ARGS}::test_disable_dropout"),
    "dataset_num_proc": honoured(
        "processes of the dataset preparation; the same rows as with one",
        f"{ARGS}::test_data_fields_give_ktos_batches",
    ),
    "max_length": honoured(
        "as KTO: rows whose prompt fills `max_length` are dropped (with a warning that counts them, an error if none is "
        "left), completions truncated to fit",
        f"{ARGS}::test_data_fields_give_ktos_batches",
    ),
    "pad_to_multiple_of": honoured(
        "batches padded to a multiple; `'auto'` as in KTO", f"{ARGS}::test_data_fields_give_ktos_batches"
    ),
    "precompute_ref_batch_size": honoured(
        "batch size of the passes before training", f"{ARGS}::test_precompute_ref_batch_size_sets_the_passes_batches"
    ),
    "desirable_weight": refused(
        "KTO weighs its two loss halves; here every row is weighted by its reward (labels become rewards 1/0)"
    ),
    "undesirable_weight": refused("as `desirable_weight`"),
    "activation_offloading": honoured(
        "activations offloaded to the CPU during the training step, with TRL's context manager (needs a GPU)",
        f"{ARGS}::test_activation_offloading_wraps_the_training_step",
    ),
    "sync_ref_model": refused(_NO_TR_DPO),
    "ref_model_mixup_alpha": refused("see `sync_ref_model`"),
    "ref_model_sync_steps": refused("see `sync_ref_model`"),
    # TrainingArguments fields whose default KTOConfig changes
    "bf16": honoured(
        "TRL's default (bf16 where the hardware has it)", f"{ARGS}::test_trl_defaults_of_training_fields"
    ),
    "gradient_checkpointing": honoured(
        "TRL's default (on), with KTO's PEFT + ZeRO-3 reentrant rule",
        f"{ARGS}::test_trl_defaults_of_training_fields",
    ),
    "logging_steps": honoured("TRL's default (10)", f"{ARGS}::test_trl_defaults_of_training_fields"),
    "train_sampling_strategy": honoured(
        "Trainer's default (`'random'`) instead of KTO's `'sequential'`, which KTO needs only to pair its KL "
        "completions within a batch; A-LoL draws rows with its own priority sampler",
        f"{ARGS}::test_trl_defaults_of_training_fields",
    ),
}

KTO_CONFIG = {
    "A-LoL": {
        **_KTO_SHARED,
        "learning_rate": honoured(
            "default 2e-5 (the paper's), not KTO's 1e-6", f"{ARGS}::test_trl_defaults_of_training_fields"
        ),
        "loss_type": honoured(
            "A-LoL's four variants (`alol`, `alol_seq`, `alol_kl`, `alol_ref_free`); KTO's values are an error naming them",
            f"{ALOL}::test_bad_config_values_are_refused",
        ),
        "beta": refused("A-LoL has no KL temperature (its KL variant's weight is `kl_coef`)"),
        "precompute_ref_log_probs": honoured(
            "always precomputed (the advantages need the reference over every row before training): `True` is "
            "accepted, `False` is an error",
            f"{ARGS}::test_alol_always_precomputes",
        ),
    },
    "DRO": {
        **_KTO_SHARED,
        "learning_rate": honoured("KTO's default (1e-6)", f"{ARGS}::test_trl_defaults_of_training_fields"),
        "loss_type": refused("DRO has one loss"),
        "beta": honoured(
            "DRO's regularisation strength `tau`, on the scale `reward_scaling` puts the rewards on (default 0.1 on "
            "rewards scaled to a range of 1, see docs/dro_trainer.md); not KTO's `beta`, so set in a KTOConfig it is "
            "an error",
            f"{DRO}::test_gradients_match_the_papers_two_objectives_after_training_moved_both",
        ),
        "precompute_ref_log_probs": honoured(
            "precomputed by default (KTO's default is a live reference); `False` runs the reference every step",
            f"{DRO}::test_live_reference_gives_the_precomputed_loss",
        ),
    },
}

# -- KTOTrainer's constructor -----------------------------------------------------------------------------------------

_KTO_TRAINER_SHARED = {
    "model": honoured(
        "a path or hub id, a `PreTrainedModel`, or a `PeftModel` (its adapter is part of the reference)",
        f"{DRO}::test_a_pretrained_peft_model_is_its_own_reference",
    ),
    "ref_model": honoured("a separate frozen reference", f"{OFFLINE}::test_separate_ref_model_scores_the_rows"),
    "args": honoured(
        "our config; a plain `TrainingArguments` is converted; a `KTOConfig` too, an error if it sets a KTO-only "
        "field away from its default",
        f"{ARGS}::test_a_kto_config_converts_unless_it_sets_kto_only_fields",
    ),
    "data_collator": honoured("used for the passes before training and for training", f"{ARGS}::test_data_collator"),
    "eval_dataset": honoured("one dataset or a dict of named ones", f"{ARGS}::test_named_eval_datasets"),
    "processing_class": honoured(
        "a tokenizer (pad token set to eos if missing, as KTO); processors of vision models are an error",
        f"{ARGS}::test_processing_class",
    ),
    "compute_metrics": honoured(
        "gets each evaluation row's log pi, log pi_ref, V(x) as predictions and its reward as label",
        f"{DRO}::test_compute_metrics_gets_each_rows_log_probs_value_and_reward",
    ),
    "callbacks": honoured("added to the Trainer's", f"{ARGS}::test_callbacks"),
    "quantization_config": honoured(
        "QLoRA as KTO loads it (bitsandbytes; adapters in bf16); DRO's value network stays trainable",
        f"{QLORA}::test_alol_and_dro_train_qlora_adapters",
    ),
    "peft_config": honoured("adapters trained, base frozen", f"{ALOL}::test_peft_trains_only_the_adapters"),
}
_KTO_FORMATS = (
    "KTO's formats (labels become rewards 1/0), rewards, unpaired preferences; standard or conversational, with "
    "`tools` and `chat_template_kwargs`"
)
KTO_TRAINER = {
    "A-LoL": {
        **_KTO_TRAINER_SHARED,
        "train_dataset": honoured(
            f"{_KTO_FORMATS}. Streaming (`IterableDataset`) is an error: the value head and the advantages need a "
            "pass over every row before training",
            f"{ALOL}::test_iterable_datasets_are_refused",
        ),
        "optimizers": honoured("the user's optimizer and scheduler", f"{ARGS}::test_alol_user_optimizer"),
    },
    "DRO": {
        **_KTO_TRAINER_SHARED,
        "train_dataset": honoured(
            f"{_KTO_FORMATS}. Streaming (`IterableDataset`) with a live reference (`precompute_ref_log_probs=False`)",
            f"{ARGS}::test_dro_streams_with_a_live_reference",
        ),
        "optimizers": refused(
            "the value network is built inside the trainer, so an optimizer made before it cannot hold it: an error "
            "that says to choose the optimizer with `optim` or to set `trainer.optimizer` after construction (used "
            "as it is when it holds every value parameter)",
            f"{DRO}::test_a_user_optimizer_must_hold_the_value_network",
        ),
    },
}

# -- SFTConfig, for IQLearn -------------------------------------------------------------------------------------------

_SAME_AS_SFT = f"{ARGS}::test_iqlearn_prepares_the_batches_sfttrainer_prepares"
SFT_CONFIG = {
    "IQLearn": {
        "model_init_kwargs": honoured("SFT's model loading", f"{ARGS}::test_model_init_kwargs_reach_from_pretrained"),
        "trust_remote_code": honoured("SFT's model loading", f"{ARGS}::test_trust_remote_code_loads_custom_code"),
        "router_aux_loss_coef": honoured(
            "the load-balancing loss added as SFT adds it",
            f"{IQL}::test_moe_load_balancing_loss_is_added_as_sft_adds_it",
        ),
        "chat_template_path": honoured("SFT's data path: the same batches as SFTTrainer", _SAME_AS_SFT),
        "dataset_text_field": honoured("SFT's data path: the same batches as SFTTrainer", _SAME_AS_SFT),
        "dataset_kwargs": honoured("SFT's data path (`skip_prepare_dataset`)", _SAME_AS_SFT),
        "dataset_num_proc": honoured("SFT's data path: the same batches as SFTTrainer", _SAME_AS_SFT),
        "eos_token": honoured("SFT's data path: the same batches as SFTTrainer", _SAME_AS_SFT),
        "max_length": honoured("SFT's data path: the same batches as SFTTrainer", _SAME_AS_SFT),
        "truncation_mode": honoured("SFT's data path: the same batches as SFTTrainer", _SAME_AS_SFT),
        "shuffle_dataset": honoured("SFT's data path: the same batches as SFTTrainer", _SAME_AS_SFT),
        "pad_to_multiple_of": honoured("SFT's data path: the same batches as SFTTrainer", _SAME_AS_SFT),
        "completion_only_loss": honoured("SFT's data path: the same batches as SFTTrainer", _SAME_AS_SFT),
        "assistant_only_loss": honoured(
            "only assistant tokens are actions",
            f"{IQL}::test_conversational_assistant_only_loss_scores_only_assistant_tokens",
        ),
        "pad_token": honoured("SFT's data path: the same batches as SFTTrainer", _SAME_AS_SFT),
        "packing": honoured(
            "SFT's packing; each packed sequence is its own episode (the TD term stops at its end), so the loss and "
            "gradients are those of the same sequences in padded rows",
            f"{IQL}::test_packed_and_padding_free_batches_match_the_same_rows_padded",
        ),
        "packing_strategy": honoured(
            "SFT's strategies; `'wrapped'` marks no boundaries, so each packed row is one episode (with a warning)",
            f"{IQL}::test_wrapped_packing_warns_that_each_row_is_one_episode",
        ),
        "eval_packing": honoured(
            "as `packing`, for evaluation; refused without padding-free batches, where SFT's collator drops the "
            "boundaries",
            f"{IQL}::test_packing_and_padding_free_train_evaluate_and_score_rows",
        ),
        "padding_free": honoured(
            "SFT's padding-free batches; each sequence is its own episode, as with `packing`",
            f"{IQL}::test_packed_and_padding_free_batches_match_the_same_rows_padded",
        ),
        "loss_type": refused(
            "IQLearn defines its own loss: only `'nll'` (`td_coef=0` is exactly SFT)",
            f"{IQL}::test_configs_iqlearn_cannot_honour_are_refused",
        ),
        "activation_offloading": honoured(
            "SFT's training step, inherited (needs a GPU)",
            f"{ARGS}::test_activation_offloading_wraps_the_training_step",
        ),
        # TrainingArguments fields whose default SFTConfig changes
        "learning_rate": honoured("SFT's default", f"{ARGS}::test_trl_defaults_of_training_fields"),
        "bf16": honoured("SFT's default", f"{ARGS}::test_trl_defaults_of_training_fields"),
        "gradient_checkpointing": honoured("SFT's default", f"{ARGS}::test_trl_defaults_of_training_fields"),
        "logging_steps": honoured("SFT's default", f"{ARGS}::test_trl_defaults_of_training_fields"),
    }
}

# -- SFTTrainer's constructor -----------------------------------------------------------------------------------------

SFT_TRAINER = {
    "model": honoured("as SFT: a path, a model or a `PeftModel`", f"{IQL}::test_peft_trains_only_the_adapters"),
    "args": honoured(
        "`IQLearnConfig`; an `SFTConfig` or `TrainingArguments` is converted",
        f"{IQL}::test_plain_training_arguments_are_converted",
    ),
    "data_collator": honoured("SFT's", f"{ARGS}::test_data_collator"),
    "train_dataset": honoured("SFT's formats, streaming included", _SAME_AS_SFT),
    "eval_dataset": honoured("one dataset or a dict of named ones", f"{IQL}::test_evaluation_logs_the_same_metrics"),
    "processing_class": honoured("SFT's", _SAME_AS_SFT),
    "compute_loss_func": refused(
        "IQLearn defines its own loss: an error naming it", f"{IQL}::test_custom_loss_function_is_refused"
    ),
    "compute_metrics": honoured("SFT's (logits recomputed for it)", f"{ARGS}::test_iqlearn_compute_metrics"),
    "callbacks": honoured("added to the Trainer's", f"{ARGS}::test_callbacks"),
    "optimizers": honoured("the user's optimizer and scheduler", f"{ARGS}::test_iqlearn_user_optimizer"),
    "optimizer_cls_and_kwargs": honoured("SFT's", f"{ARGS}::test_iqlearn_user_optimizer"),
    "preprocess_logits_for_metrics": honoured("SFT's", f"{ARGS}::test_iqlearn_compute_metrics"),
    "quantization_config": honoured("QLoRA as SFT loads it", f"{QLORA}::test_iqlearn_trains_qlora_adapters"),
    "peft_config": honoured("adapters trained, base frozen", f"{IQL}::test_peft_trains_only_the_adapters"),
    "formatting_func": honoured("SFT's data path", _SAME_AS_SFT),
}


def trl_config_fields(config_class) -> dict[str, object]:
    """The fields a TRL config adds to `TrainingArguments`, and those whose default it changes: name -> default."""
    from transformers import TrainingArguments

    base = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}
    return {
        f.name: f.default
        for f in dataclasses.fields(config_class)
        if f.init and (f.name not in base or f.default != base[f.name])
    }


def trl_constructor_arguments(trainer_class) -> list[str]:
    return [name for name in inspect.signature(trainer_class.__init__).parameters if name != "self"]


def render() -> str:
    """docs/parity.md."""
    lines = [
        "# Drop-in parity with TRL",
        "",
        "<!-- Rendered from tests/parity_table.py (`python tests/parity_table.py > docs/parity.md`); "
        "tests/test_parity.py checks that it is current. -->",
        "",
        "Every argument a user passes to `KTOTrainer` (for `ALoLTrainer` and `DROTrainer`) or `SFTTrainer` (for "
        "`IQLearnTrainer`), and every field their configs add to `transformers.TrainingArguments` or whose default "
        "they change, is **honoured** (a test shows it), **refused** before training with an error naming it, or "
        "**not applicable**. A field a later TRL adds fails `tests/test_parity.py` until it is classified. The "
        "fields of `TrainingArguments` itself are inherited and run by `transformers.Trainer` in all three trainers. "
        "A KTO-only field is refused by absence: our configs have no such field, so setting it is a `TypeError` "
        "naming it (a `KTOConfig` passed as `args` is converted, and an error if it sets one away from KTO's "
        "default).",
        "",
    ]

    def table(title: str, rows: dict[str, dict[str, Row]]) -> None:
        trainers = list(rows)
        names = list(dict.fromkeys(name for trainer in trainers for name in rows[trainer]))
        lines.extend(
            [f"## {title}", "", "| argument | " + " | ".join(trainers) + " |", "|---|" + "---|" * len(trainers)]
        )
        for name in names:
            cells = []
            for trainer in trainers:
                row = rows[trainer][name]
                test = f" ({row.evidence.split('::')[-1]})" if row.evidence not in ("", NO_SUCH_FIELD) else ""
                cells.append(f"**{row.status}**: {row.how}{test}")
            lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
        lines.append("")

    table("`KTOConfig` fields: `ALoLConfig`, `DROConfig`", KTO_CONFIG)
    table("`KTOTrainer` arguments: `ALoLTrainer`, `DROTrainer`", KTO_TRAINER)
    table("`SFTConfig` fields: `IQLearnConfig`", SFT_CONFIG)
    table("`SFTTrainer` arguments: `IQLearnTrainer`", {"IQLearn": SFT_TRAINER})
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
