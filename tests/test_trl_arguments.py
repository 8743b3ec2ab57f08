"""Arguments a KTO or SFT user passes, run with TRL's trainer and with ours: each does here what it does there (the
rows of docs/parity.md that no trainer-specific test covers)."""

import dataclasses
import json
import os

import pytest
import torch
from datasets import Dataset
from helpers import cpu_run_args
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import KTOConfig, KTOTrainer, SFTConfig, SFTTrainer

from trl_offline import ALoLConfig, ALoLTrainer, DROConfig, DROTrainer, IQLearnConfig, IQLearnTrainer
from trl_offline.collator import DataCollatorForRewardedCompletions
from trl_offline.offline_kit import build_tiny_model, make_dataset, make_scored_dataset


def _labelled(num_rows=8, dataset_format="prompt_completion"):
    return make_scored_dataset(dataset_format, num_rows, score="label")


def _dro(tmp_path, model, **overrides):
    return DROTrainer(model, args=DROConfig(**cpu_run_args(tmp_path, **overrides)), train_dataset=_labelled())


# -- configs --------------------------------------------------------------------------------------------------------


def _default(config_class, name):
    return {f.name: f.default for f in dataclasses.fields(config_class)}[name]


@pytest.mark.parametrize(
    "ours,trls,differ",
    [
        (ALoLConfig, KTOConfig, {"learning_rate": 2e-5, "train_sampling_strategy": "random"}),
        (DROConfig, KTOConfig, {"train_sampling_strategy": "random"}),
        (IQLearnConfig, SFTConfig, {}),
    ],
)
def test_trl_defaults_of_training_fields(ours, trls, differ):
    # The training fields whose defaults TRL changes keep TRL's, except the documented ones
    for name in ("learning_rate", "bf16", "gradient_checkpointing", "logging_steps", "train_sampling_strategy"):
        assert _default(ours, name) == differ.get(name, _default(trls, name)), name


def test_alol_always_precomputes(tmp_path):
    assert ALoLConfig(**cpu_run_args(tmp_path, precompute_ref_log_probs=True)).precompute_ref_log_probs
    with pytest.raises(ValueError, match="precompute_ref_log_probs=True"):
        ALoLConfig(**cpu_run_args(tmp_path, precompute_ref_log_probs=False))


@pytest.mark.parametrize("config_class", [ALoLConfig, DROConfig, IQLearnConfig])
def test_activation_offloading_wraps_the_training_step(tmp_path, tiny_model_path, config_class):
    if not torch.cuda.is_available():
        # TRL's offloading moves activations from an accelerator; on a CPU run it would fail inside the first step
        with pytest.raises(ValueError, match="activation_offloading"):
            config_class(**cpu_run_args(tmp_path, activation_offloading=True))
        return
    trainer_class = {ALoLConfig: ALoLTrainer, DROConfig: DROTrainer, IQLearnConfig: IQLearnTrainer}[config_class]
    args = config_class(**cpu_run_args(tmp_path, use_cpu=False, activation_offloading=True, max_steps=1))
    dataset = make_dataset("prompt_completion", 8) if config_class is IQLearnConfig else _labelled()
    trainer = trainer_class(tiny_model_path, args=args, train_dataset=dataset)
    trainer.train()
    assert trainer.state.global_step == 1


def test_pad_to_multiple_of_reads_ktos_values(tmp_path):
    assert DROConfig(**cpu_run_args(tmp_path)).pad_to_multiple_of is None  # "auto" pads only on Neuron
    assert DROConfig(**cpu_run_args(tmp_path, pad_to_multiple_of="16")).pad_to_multiple_of == 16  # command line
    assert DROConfig(**cpu_run_args(tmp_path, pad_to_multiple_of="none")).pad_to_multiple_of is None


def test_a_kto_config_converts_unless_it_sets_kto_only_fields(tmp_path, tiny_model_path):
    # KTO's own fields at their defaults are dropped (DRO's take theirs); set away from them, they are named
    kto = KTOConfig(**cpu_run_args(tmp_path, max_steps=1, precompute_ref_log_probs=True))
    trainer = DROTrainer(tiny_model_path, args=kto, train_dataset=_labelled())
    assert isinstance(trainer.args, DROConfig) and trainer.args.max_steps == 1
    # DRO's beta on its own scale (KTO's default 0.1, dropped, happens to be the same number)
    assert (trainer.args.reward_scaling, trainer.args.beta) == ("range", 0.1)
    for field, value in (("beta", 0.3), ("desirable_weight", 2.0), ("sync_ref_model", True)):
        kto = KTOConfig(**cpu_run_args(tmp_path, **{field: value}))
        with pytest.raises(ValueError, match=f"sets \\['{field}'\\]"):
            DROTrainer(tiny_model_path, args=kto, train_dataset=_labelled())
    with pytest.raises(ValueError, match="A-LoL does not have"):
        ALoLTrainer(tiny_model_path, args=KTOConfig(**cpu_run_args(tmp_path, beta=0.3)), train_dataset=_labelled())


# -- model loading --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("trainer_class", [ALoLTrainer, DROTrainer, IQLearnTrainer])
def test_model_init_kwargs_reach_from_pretrained(tmp_path, tiny_model_path, trainer_class):
    config_class = {ALoLTrainer: ALoLConfig, DROTrainer: DROConfig, IQLearnTrainer: IQLearnConfig}[trainer_class]
    args = config_class(**cpu_run_args(tmp_path, model_init_kwargs={"dtype": torch.float64}))
    dataset = make_dataset("prompt_completion", 8) if trainer_class is IQLearnTrainer else _labelled()
    trainer = trainer_class(tiny_model_path, args=args, train_dataset=dataset)
    assert trainer.model.dtype == torch.float64
    if trainer_class is DROTrainer:  # the value network's body is loaded like the model
        assert trainer.value_model.body.dtype == torch.float64


_CUSTOM_CONFIG = """
from transformers import LlamaConfig


class KitCustomConfig(LlamaConfig):
    model_type = "trl_offline_kit_custom"
"""
_CUSTOM_MODEL = """
from transformers import LlamaForCausalLM

from .configuration_custom import KitCustomConfig


class KitCustomForCausalLM(LlamaForCausalLM):
    config_class = KitCustomConfig
"""


@pytest.fixture(scope="module")
def custom_code_model_path(tmp_path_factory):
    """A tiny Llama saved as a model whose architecture lives in the checkpoint's own code (`auto_map`)."""
    path = build_tiny_model(str(tmp_path_factory.mktemp("custom-code")))
    with open(os.path.join(path, "configuration_custom.py"), "w") as f:
        f.write(_CUSTOM_CONFIG)
    with open(os.path.join(path, "modeling_custom.py"), "w") as f:
        f.write(_CUSTOM_MODEL)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["model_type"] = "trl_offline_kit_custom"
    config["architectures"] = ["KitCustomForCausalLM"]
    config["auto_map"] = {
        "AutoConfig": "configuration_custom.KitCustomConfig",
        "AutoModel": "modeling_custom.KitCustomForCausalLM",
        "AutoModelForCausalLM": "modeling_custom.KitCustomForCausalLM",
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path


@pytest.mark.parametrize("trainer_class", [DROTrainer, IQLearnTrainer])
def test_trust_remote_code_loads_custom_code(tmp_path, custom_code_model_path, trainer_class):
    config_class = DROConfig if trainer_class is DROTrainer else IQLearnConfig
    dataset = make_dataset("prompt_completion", 8) if trainer_class is IQLearnTrainer else _labelled()
    with pytest.raises(ValueError, match="trust_remote_code"):
        trainer_class(custom_code_model_path, args=config_class(**cpu_run_args(tmp_path)), train_dataset=dataset)
    args = config_class(**cpu_run_args(tmp_path, trust_remote_code=True))
    trainer = trainer_class(custom_code_model_path, args=args, train_dataset=dataset)
    assert type(trainer.model).__name__ == "KitCustomForCausalLM"


@pytest.mark.parametrize("disable_dropout", [True, False])
def test_disable_dropout(tmp_path, tiny_tied_model_path, disable_dropout):
    # GPT-2's config has dropout 0.1 in its `nn.Dropout` layers
    trainer = _dro(tmp_path, tiny_tied_model_path, disable_dropout=disable_dropout)
    for model in (trainer.model, trainer.value_model):
        rates = {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
        assert rates == ({0.0} if disable_dropout else {0.1})


# -- data -----------------------------------------------------------------------------------------------------------


_BATCH_KEYS = ("input_ids", "attention_mask", "completion_mask")


@pytest.mark.parametrize(
    "fields", [{"max_length": 7}, {"pad_to_multiple_of": 16}, {"pad_to_multiple_of": "auto"}, {"dataset_num_proc": 2}]
)
def test_data_fields_give_ktos_batches(tmp_path, tiny_model_path, fields):
    rows = _labelled(6).to_list() + [{"prompt": "abcdefgh=", "completion": "abcdefgh", "label": True}]
    dataset = Dataset.from_list(rows)
    common = cpu_run_args(tmp_path, **fields)
    kto = KTOTrainer(
        tiny_model_path,
        args=KTOConfig(**common, loss_type="apo_zero_unpaired", precompute_ref_log_probs=False),
        train_dataset=dataset,
    )
    dro = DROTrainer(tiny_model_path, args=DROConfig(**common), train_dataset=dataset)
    assert dro.train_dataset["prompt_ids"] == kto.train_dataset["prompt_ids"]
    kto_batch = kto.data_collator([kto.train_dataset[i] for i in range(len(kto.train_dataset))])
    dro_batch = dro.data_collator([dro.train_dataset[i] for i in range(len(dro.train_dataset))])
    for key in _BATCH_KEYS:
        torch.testing.assert_close(dro_batch[key], kto_batch[key], msg=key)


def test_precompute_ref_batch_size_sets_the_passes_batches(tmp_path, tiny_model_path):
    def reference_batches(**overrides):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
        sizes = []
        model.register_forward_pre_hook(
            lambda module, args, kwargs: sizes.append(len(kwargs["input_ids"])), with_kwargs=True
        )
        DROTrainer(
            model,
            args=DROConfig(**cpu_run_args(tmp_path, per_device_train_batch_size=2, **overrides)),
            train_dataset=_labelled(10),
        )
        return sizes

    assert reference_batches(precompute_ref_batch_size=4) == [4, 4, 2]
    assert reference_batches() == [2] * 5  # the training batch size by default


def test_named_eval_datasets(tmp_path, tiny_model_path):
    trainer = DROTrainer(
        tiny_model_path,
        args=DROConfig(**cpu_run_args(tmp_path)),
        train_dataset=_labelled(),
        eval_dataset={"easy": _labelled(4), "hard": _labelled(6)},
    )
    metrics = trainer.evaluate()
    assert {"eval_easy_loss", "eval_hard_loss"} <= set(metrics)
    assert metrics["eval_easy_loss"] != metrics["eval_hard_loss"]


def test_processing_class(tmp_path, tiny_model_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    tokenizer.pad_token = None
    trainer = DROTrainer(
        tiny_model_path,
        args=DROConfig(**cpu_run_args(tmp_path)),
        train_dataset=_labelled(),
        processing_class=tokenizer,
    )
    assert trainer.processing_class is tokenizer and tokenizer.pad_token == tokenizer.eos_token  # as KTO sets it
    assert trainer.model.config.pad_token_id == tokenizer.eos_token_id
    with pytest.raises(TypeError, match="processing_class"):
        DROTrainer(
            tiny_model_path,
            args=DROConfig(**cpu_run_args(tmp_path)),
            train_dataset=_labelled(),
            processing_class=object(),
        )


class _CountingCollator(DataCollatorForRewardedCompletions):
    calls = 0

    def __call__(self, *args, **kwargs):
        type(self).calls += 1
        return super().__call__(*args, **kwargs)


def test_data_collator(tmp_path, tiny_model_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    _CountingCollator.calls = 0
    trainer = DROTrainer(
        tiny_model_path,
        args=DROConfig(**cpu_run_args(tmp_path, max_steps=2)),
        train_dataset=_labelled(),
        data_collator=_CountingCollator(tokenizer.pad_token_id),
    )
    precompute_calls = _CountingCollator.calls
    assert precompute_calls == 2  # 8 rows, batches of 4: the reference pass collates with it
    trainer.train()
    assert _CountingCollator.calls >= precompute_calls + 2  # and so does training


class _StepCounter(TrainerCallback):
    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


@pytest.mark.parametrize("trainer_class", [DROTrainer, IQLearnTrainer])
def test_callbacks(tmp_path, tiny_model_path, trainer_class):
    counter = _StepCounter()
    config_class = DROConfig if trainer_class is DROTrainer else IQLearnConfig
    dataset = make_dataset("prompt_completion", 8) if trainer_class is IQLearnTrainer else _labelled()
    trainer_class(
        tiny_model_path,
        args=config_class(**cpu_run_args(tmp_path, max_steps=2)),
        train_dataset=dataset,
        callbacks=[counter],
    ).train()
    assert counter.steps == 2


# -- IQLearn runs SFT's data path -------------------------------------------------------------------------------------


_CHAT_TEMPLATE_FILE = (
    "{%- for message in messages %}{{- '[' + message['role'] + '] ' + message['content'] + '<|im_end|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '[assistant] ' }}{%- endif %}"
)


def _sft_cases(tmp_path):
    template = tmp_path / "template.jinja"
    template.write_text(_CHAT_TEMPLATE_FILE)
    text_rows = Dataset.from_list([{"content": row["text"]} for row in make_dataset("language_modeling", 8)])
    tokenized = Dataset.from_list([{"input_ids": [5, 6, 7, 8][: 2 + i % 3]} for i in range(8)])
    prompt_completion = make_dataset("prompt_completion", 8)
    return {
        "chat_template_path": (
            {"chat_template_path": str(template)},
            make_dataset("conversational_prompt_completion", 8),
        ),
        "dataset_text_field": ({"dataset_text_field": "content"}, text_rows),
        "dataset_kwargs": ({"dataset_kwargs": {"skip_prepare_dataset": True}}, tokenized),
        "dataset_num_proc": ({"dataset_num_proc": 2}, prompt_completion),
        "eos_token": ({"eos_token": "<s>"}, prompt_completion),
        "max_length": ({"max_length": 6}, prompt_completion),
        "truncation_mode": ({"max_length": 6, "truncation_mode": "keep_end"}, prompt_completion),
        "shuffle_dataset": ({"shuffle_dataset": True}, prompt_completion),
        "pad_to_multiple_of": ({"pad_to_multiple_of": 16}, prompt_completion),
        "completion_only_loss": ({"completion_only_loss": False}, prompt_completion),
        "pad_token": ({"pad_token": "<unk>"}, prompt_completion),
    }


_SFT_FIELDS = [
    "chat_template_path", "dataset_text_field", "dataset_kwargs", "dataset_num_proc", "eos_token", "max_length",
    "truncation_mode", "shuffle_dataset", "pad_to_multiple_of", "completion_only_loss", "pad_token",
]  # fmt: skip


@pytest.mark.parametrize("case", _SFT_FIELDS)
def test_iqlearn_prepares_the_batches_sfttrainer_prepares(tmp_path, tiny_model_path, case):
    fields, dataset = _sft_cases(tmp_path)[case]
    common = cpu_run_args(tmp_path, **fields)
    sft = SFTTrainer(tiny_model_path, args=SFTConfig(**common), train_dataset=dataset)
    iql = IQLearnTrainer(tiny_model_path, args=IQLearnConfig(**common), train_dataset=dataset)
    assert iql.train_dataset.to_list() == sft.train_dataset.to_list()
    sft_batch, iql_batch = next(iter(sft.get_train_dataloader())), next(iter(iql.get_train_dataloader()))
    assert set(iql_batch) == set(sft_batch)
    for key in sft_batch:
        torch.testing.assert_close(iql_batch[key], sft_batch[key], msg=key)


def test_iqlearn_compute_metrics(tmp_path, tiny_model_path):
    seen = {}

    def preprocess(logits, labels):
        seen["logits_shape"] = tuple(logits.shape)
        return logits.argmax(-1)

    def compute_metrics(prediction):
        seen["predictions_shape"] = prediction.predictions.shape
        return {"first_token": float(prediction.predictions[0, 0])}

    dataset = make_dataset("prompt_completion", 8)
    trainer = IQLearnTrainer(
        tiny_model_path,
        args=IQLearnConfig(**cpu_run_args(tmp_path)),
        train_dataset=dataset,
        eval_dataset=dataset,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess,
    )
    metrics = trainer.evaluate()
    vocab = trainer.model.config.vocab_size
    assert seen["logits_shape"][0] == 4 and seen["logits_shape"][-1] == vocab  # the logits of a batch, recomputed
    assert seen["predictions_shape"][0] == 8 and "eval_first_token" in metrics


def test_iqlearn_user_optimizer(tmp_path, tiny_model_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.lm_head.weight.detach().clone()
    dataset = make_dataset("prompt_completion", 8)
    trainer = IQLearnTrainer(
        model,
        args=IQLearnConfig(**cpu_run_args(tmp_path, max_steps=1)),
        train_dataset=dataset,
        optimizers=(optimizer, None),
    )
    trainer.train()
    assert getattr(trainer.optimizer, "optimizer", trainer.optimizer) is optimizer  # under accelerate's wrapper
    assert not torch.equal(model.lm_head.weight, before)
    trainer = IQLearnTrainer(
        tiny_model_path,
        args=IQLearnConfig(**cpu_run_args(tmp_path, max_steps=1)),
        train_dataset=dataset,
        optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.1}),
    )
    trainer.train()
    assert isinstance(getattr(trainer.optimizer, "optimizer", trainer.optimizer), torch.optim.SGD)


def test_alol_user_optimizer(tmp_path, tiny_model_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.lm_head.weight.detach().clone()
    trainer = ALoLTrainer(
        model,
        args=ALoLConfig(**cpu_run_args(tmp_path, max_steps=1)),
        train_dataset=make_scored_dataset("prompt_completion", 8),
        optimizers=(optimizer, None),
    )
    trainer.train()
    assert getattr(trainer.optimizer, "optimizer", trainer.optimizer) is optimizer
    assert not torch.equal(model.lm_head.weight, before)


def test_dro_streams_with_a_live_reference(tmp_path, tiny_model_path):
    rows = _labelled(16).to_list()
    rows.insert(5, {"prompt": "abcdefgh" * 4 + "=", "completion": "abc", "label": True})  # dropped: prompt too long
    stream = Dataset.from_list(rows).to_iterable_dataset()
    common = cpu_run_args(tmp_path, max_steps=2, max_length=24, precompute_ref_log_probs=False)
    with pytest.raises(TypeError, match="precompute_ref_log_probs=True"):
        DROTrainer(tiny_model_path, args=DROConfig(**cpu_run_args(tmp_path)), train_dataset=stream)
    with pytest.raises(TypeError, match="reward_funcs"):
        DROTrainer(tiny_model_path, args=DROConfig(**common), train_dataset=stream, reward_funcs=lambda **kw: [0.0])

    streamed = DROTrainer(tiny_model_path, args=DROConfig(**common), train_dataset=stream)
    streamed.train()
    # The same rows in the same order, map-style: the same statistics, the same two updates
    in_order = DROConfig(**common, train_sampling_strategy="sequential")
    mapped = DROTrainer(tiny_model_path, args=in_order, train_dataset=Dataset.from_list(rows))
    mapped.train()
    assert (streamed.reward_shift, streamed.reward_scale) == (mapped.reward_shift, mapped.reward_scale)
    assert streamed.state.global_step == 2
    start = AutoModelForCausalLM.from_pretrained(tiny_model_path).lm_head.weight
    assert not torch.allclose(streamed.model.lm_head.weight, start)
    for (name, streamed_weight), mapped_weight in zip(streamed.model.named_parameters(), mapped.model.parameters()):
        torch.testing.assert_close(streamed_weight, mapped_weight, msg=name)
