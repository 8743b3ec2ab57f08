"""The A-LoL/DRO data path tokenizes exactly as TRL's `KTOTrainer` does, and IQ-Learn's as `SFTTrainer` does, with
the kit's character tokenizer and its byte-level BPE: same prompt/completion split, `tools` and
`chat_template_kwargs` reaching the chat template, prompts that fill `max_length` dropped."""

import json
import logging

import pytest
from datasets import Dataset
from helpers import cpu_run_args
from transformers import AutoTokenizer
from trl import KTOConfig, KTOTrainer, SFTConfig, SFTTrainer
from trl.data_utils import common_prefix_length

from trl_offline import ALoLConfig, ALoLTrainer, DROConfig, DROTrainer, IQLearnConfig, IQLearnTrainer
from trl_offline.offline_kit import SORT_TOOL, make_scored_dataset, sort_reward_func


MAX_LENGTH = 120
LONG = "=".join("hgfedcba" * 8)  # 127 characters that no tokenizer here merges: over MAX_LENGTH tokens either way
MERGING = {"prompt": "cab=ab", "completion": "c"}  # the BPE has "abc": the prompt's last token merges


def _standard_rows() -> list[dict]:
    rows = make_scored_dataset("prompt_completion", 8, seed=3, score="label").to_list()
    rows.insert(2, {"prompt": f"{LONG}=", "completion": "abc", "label": True})
    rows.insert(5, {**MERGING, "label": False})
    rows.append({"prompt": "ba=", "completion": "ab<|im_end|>", "label": True})  # already ends with eos
    return rows


def _conversational_rows(tools_as_json: bool = False) -> list[dict]:
    rows = []
    for i, row in enumerate(make_scored_dataset("conversational_prompt_completion", 8, seed=4, score="label")):
        tools = [SORT_TOOL] if i % 2 else None
        row["tools"] = json.dumps(tools) if tools_as_json and tools else tools
        row["chat_template_kwargs"] = {"enable_thinking": i % 3 == 0}
        rows.append(row)
    long = {"prompt": [{"role": "user", "content": LONG}], "completion": [{"role": "assistant", "content": "a"}]}
    rows.insert(3, {**long, "label": False, "tools": None, "chat_template_kwargs": {"enable_thinking": False}})
    return rows


def _kto_dataset(model_path, rows, output_dir) -> Dataset:
    args = KTOConfig(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        report_to="none",
        gradient_checkpointing=False,
        loss_type="apo_zero_unpaired",  # no KL completions to build
        precompute_ref_log_probs=False,
        max_length=MAX_LENGTH,
    )
    return KTOTrainer(model_path, args=args, train_dataset=Dataset.from_list(rows)).train_dataset


def _ours(trainer_class, model_path, rows, output_dir, **overrides):
    if trainer_class is DROTrainer:
        args = DROConfig(**cpu_run_args(output_dir, max_length=MAX_LENGTH, **overrides))
    else:
        overrides = dict(value_num_prompts=4, value_num_epochs=1, max_completion_length=4, **overrides)
        args = ALoLConfig(**cpu_run_args(output_dir, max_length=MAX_LENGTH, **overrides))
    dataset = Dataset.from_list(rows)
    eval_dataset = dataset if trainer_class is ALoLTrainer else None
    return trainer_class(model_path, args=args, train_dataset=dataset, eval_dataset=eval_dataset)


def _assert_same_rows(ours: Dataset, kto: Dataset, num_rows: int) -> None:
    assert len(ours) == len(kto) == num_rows
    assert ours["prompt_ids"] == kto["prompt_ids"]
    assert ours["completion_ids"] == kto["completion_ids"]  # whole: every kept row fits in MAX_LENGTH


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_standard_rows_tokenize_as_kto(tmp_path, tiny_model_path, tiny_bpe_model_path, tokenizer, caplog):
    model_path = tiny_model_path if tokenizer == "char" else tiny_bpe_model_path
    rows = _standard_rows()
    kto = _kto_dataset(model_path, rows, tmp_path / "kto")
    with caplog.at_level(logging.WARNING):
        ours = _ours(DROTrainer, model_path, rows, tmp_path / "dro", precompute_ref_log_probs=False)
    _assert_same_rows(ours.train_dataset, kto, len(rows) - 1)  # the LONG prompt is dropped
    assert "Dropped 1 of the 11 rows of the train dataset (rows [2])" in caplog.text
    tok = ours.processing_class
    merging = ours.train_dataset[4]  # MERGING, after the dropped row
    prompt_ids = tok(MERGING["prompt"])["input_ids"]
    if tokenizer == "bpe":  # "ab" + "c" is one token: the prompt loses its last token to the completion, as in KTO
        assert common_prefix_length(prompt_ids, tok("cab=abc<|im_end|>")["input_ids"]) < len(prompt_ids)
        assert merging["prompt_ids"] == prompt_ids[:-1]
        assert tok.decode(merging["completion_ids"]) == "abc<|im_end|>"
        assert "is not a prefix of its tokenized prompt + completion" in caplog.text
    else:
        assert merging["prompt_ids"] == prompt_ids
        assert tok.decode(merging["completion_ids"]) == "c<|im_end|>"
    assert tok.decode(ours.train_dataset[-1]["completion_ids"]) == "ab<|im_end|>"  # no second eos


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_conversational_rows_with_tools_tokenize_as_kto(tmp_path, tiny_model_path, tiny_bpe_model_path, tokenizer):
    model_path = tiny_model_path if tokenizer == "char" else tiny_bpe_model_path
    rows = _conversational_rows(tools_as_json=tokenizer == "bpe")  # KTO takes tools as a list or a JSON string
    kto = _kto_dataset(model_path, rows, tmp_path / "kto")
    ours = _ours(DROTrainer, model_path, rows, tmp_path / "dro")
    _assert_same_rows(ours.train_dataset, kto, len(rows) - 1)
    if tokenizer == "bpe":  # the tools and the template argument reached the template
        kept = rows[:3] + rows[4:]
        prompts = [ours.processing_class.decode(ids) for ids in ours.train_dataset["prompt_ids"]]
        assert ["sort_letters" in p for p in prompts] == [r["tools"] is not None for r in kept]
        assert ["Think first." in p for p in prompts] == [r["chat_template_kwargs"]["enable_thinking"] for r in kept]


def test_alol_tokenizes_as_kto(tmp_path, tiny_bpe_model_path):
    rows = _conversational_rows()
    kto = _kto_dataset(tiny_bpe_model_path, rows, tmp_path / "kto")
    ours = _ours(ALoLTrainer, tiny_bpe_model_path, rows, tmp_path / "alol")
    # A-LoL trains on the rows of positive advantage only; the evaluation rows are every row, in order
    _assert_same_rows(ours.eval_dataset, kto, len(rows) - 1)


def test_reward_funcs_score_only_the_kept_rows(tmp_path, tiny_model_path, caplog):
    rows = [{k: r[k] for k in ("prompt", "completion")} for r in _standard_rows()]
    trainer = DROTrainer(
        tiny_model_path,
        args=DROConfig(**cpu_run_args(tmp_path, max_length=MAX_LENGTH, reward_scaling="none")),
        train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list(rows[:4]),
        reward_funcs=sort_reward_func,
    )
    kept = rows[:2] + rows[3:]
    expected = sort_reward_func([r["prompt"] for r in kept], [r["completion"] for r in kept])
    assert trainer.train_dataset["reward"] == pytest.approx(expected)
    assert trainer.eval_dataset["reward"] == pytest.approx(expected[:3])
    assert "Dropped 1 of the 4 rows of the eval dataset (rows [2])" in caplog.text


def test_when_every_prompt_fills_max_length_the_run_is_refused(tmp_path, tiny_model_path):
    rows = [
        {"prompt": f"{LONG}=", "completion": "a", "reward": 1.0},
        {"prompt": LONG, "completion": "b", "reward": 0.0},
    ]
    with pytest.raises(ValueError, match=r"Every row of the train dataset \(2\).*`max_length=120`"):
        _ours(DROTrainer, tiny_model_path, rows, tmp_path)


def test_bad_template_columns_are_refused(tmp_path, tiny_model_path):
    rows = [{"prompt": [{"role": "user", "content": "ba"}], "completion": [{"role": "assistant", "content": "ab"}]}]
    with pytest.raises(ValueError, match="Row 0 of column 'tools' is a string but not valid JSON"):
        _ours(DROTrainer, tiny_model_path, [{**rows[0], "reward": 1.0, "tools": "[{"}], tmp_path)
    with pytest.raises(TypeError, match="Row 0 of column 'chat_template_kwargs' must be a dict"):
        _ours(DROTrainer, tiny_model_path, [{**rows[0], "reward": 1.0, "chat_template_kwargs": "think"}], tmp_path)


@pytest.mark.parametrize("dataset_format", ["conversational_prompt_completion", "conversational_language_modeling"])
def test_iqlearn_tokenizes_as_sft(tmp_path, tiny_bpe_model_path, dataset_format):
    rows = make_scored_dataset("conversational_prompt_completion", 6, seed=5, score="none").to_list()
    if dataset_format == "conversational_language_modeling":
        rows = [{"messages": r["prompt"] + r["completion"]} for r in rows]
    for i, row in enumerate(rows):
        row["tools"] = [SORT_TOOL] if i % 2 else None
        row["chat_template_kwargs"] = {"enable_thinking": i % 3 == 0}
    fields = cpu_run_args(tmp_path, max_length=128, assistant_only_loss=True)
    datasets = [
        trainer_class(tiny_bpe_model_path, args=config_class(**fields), train_dataset=Dataset.from_list(rows))
        for trainer_class, config_class in ((SFTTrainer, SFTConfig), (IQLearnTrainer, IQLearnConfig))
    ]
    sft, iqlearn = (trainer.train_dataset for trainer in datasets)
    assert len(iqlearn) == len(sft) == len(rows)
    assert iqlearn["input_ids"] == sft["input_ids"]
    assert iqlearn["labels"] == sft["labels"]  # -100 off the assistant's tokens
    assert all(-100 in labels and set(labels) != {-100} for labels in iqlearn["labels"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_bpe_model_path)
    texts = [tokenizer.decode(ids) for ids in iqlearn["input_ids"]]
    assert ["sort_letters" in t for t in texts] == [r["tools"] is not None for r in rows]
    assert ["Think first." in t for t in texts] == [r["chat_template_kwargs"]["enable_thinking"] for r in rows]
