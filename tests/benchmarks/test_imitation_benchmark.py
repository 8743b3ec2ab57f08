"""The imitation benchmark: its expert and scoring against hand-computed values, and the quick run in CI (that it
completes and writes its results, not their numbers)."""

import math
import sys

import pytest
import torch
from launch_utils import ROOT, run_quick_benchmark


sys.path.insert(0, str(ROOT / "benchmarks"))
import imitation  # noqa: E402


def test_task_reward_is_sortedness_of_valid_answers_only():
    assert imitation.inversions("abcd") == 0
    assert imitation.inversions("dcba") == 6
    assert imitation.task_reward("dbca", "abcd") == 1.0
    assert imitation.task_reward("dbca", "bacd") == pytest.approx(1 - 1 / 6)
    assert imitation.task_reward("dbca", "dcba") == 0.0
    assert imitation.task_reward("dbca", "abce") == 0.0  # not an ordering of the prompt's letters
    assert imitation.task_reward("dbca", "abc") == 0.0


def test_expert_is_mallows_around_the_sorted_letters():
    distribution = imitation.expert_distribution("cab")
    assert sorted(distribution) == ["abc", "acb", "bac", "bca", "cab", "cba"]
    assert sum(distribution.values()) == pytest.approx(1.0)
    # one inversion costs a factor exp(-theta); inversions of the 6 orderings: 0, 1, 1, 2, 2, 3
    assert distribution["abc"] / distribution["acb"] == pytest.approx(math.exp(imitation.THETA))
    z = 1 + 2 * math.exp(-imitation.THETA) + 2 * math.exp(-2 * imitation.THETA) + math.exp(-3 * imitation.THETA)
    assert distribution["cba"] == pytest.approx(math.exp(-3 * imitation.THETA) / z)


def test_held_out_letter_sets_never_appear_in_the_demonstrations():
    train_sets, held_out_sets = imitation.split_letter_sets(128, seed=0)
    assert len(held_out_sets) == 128
    assert len(train_sets) + len(held_out_sets) == math.comb(12, 4) + math.comb(12, 5)
    # More demonstrations than letter sets: sets repeat, never a held-out one
    rows = imitation.demonstrations(train_sets, 2000, seed=0)
    shown = {"".join(sorted(row["prompt"][0]["content"])) for row in rows}
    assert shown <= set(train_sets)
    assert not shown & set(held_out_sets)
    for row in rows[:50]:
        letters, answer = row["prompt"][0]["content"], row["completion"][0]["content"]
        assert sorted(answer) == sorted(letters)


def test_answer_log_probs_in_a_padded_batch_equal_one_row_at_a_time(tiny_model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    prompts, answers = ["dbca", "fe", "abcde"], ["abcd", "ef", "a"]
    batched = imitation.answer_log_probs(model, tokenizer, prompts, answers)
    for prompt, answer, log_prob in zip(prompts, answers, batched):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip
        prompt_ids = tokenizer(text, add_special_tokens=False).input_ids
        answer_ids = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False).input_ids
        assert len(answer_ids) == len(answer) + 1  # one token per letter, then the end of turn
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + answer_ids])).logits[0]
        expected = sum(
            logits[len(prompt_ids) + i - 1].log_softmax(-1)[token].item() for i, token in enumerate(answer_ids)
        )
        assert log_prob == pytest.approx(expected, abs=1e-4)


def test_quick_imitation_benchmark_runs_and_writes_its_json_and_plot(tmp_path):
    record = run_quick_benchmark("imitation.py", tmp_path / "imitation.json")
    assert set(record["summary"]) == {"random start, 128 demonstrations", "pretrained start, 128 demonstrations"}
    for start in ("random", "pretrained"):
        summary = record["summary"][f"{start} start, 128 demonstrations"]
        start_row = {"start"} if start == "pretrained" else set()  # the pretrained model itself, before any method
        assert set(summary) == {"expert", "sft", "iqlearn@0", "iqlearn@0.1"} | start_row
        for method in ("sft", "iqlearn@0", "iqlearn@0.1", *start_row):
            assert set(summary[method]) == set(imitation.METRICS)
            assert 0.0 <= summary[method]["total_variation"]["mean"] <= 1.0
        # Same rows, same order, same steps: every method saw the same tokens
        run = record["runs"][f"{start} start, 128 demonstrations"]["0"]
        tokens = {run[method]["num_tokens"] for method in ("sft", "iqlearn@0", "iqlearn@0.1")}
        assert len(tokens) == 1


def test_behaviour_data_has_the_tasks_format_and_mostly_invalid_answers():
    train_sets, _ = imitation.split_letter_sets(128, seed=0)
    rows = imitation.behaviour_rows(train_sets, 3000, seed=0)
    valid = [sorted(r["completion"][0]["content"]) == sorted(r["prompt"][0]["content"]) for r in rows]
    assert 0.30 < sum(valid) / len(valid) < 0.37  # a third valid, by construction
    for row in rows[:100]:
        letters, answer = row["prompt"][0]["content"], row["completion"][0]["content"]
        assert abs(len(answer) - len(letters)) <= 1 and set(answer) <= set(imitation.ALPHABET)
