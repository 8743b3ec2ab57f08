import math

import pytest
import torch
from datasets import Dataset, load_from_disk
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from trl_offline.offline_kit import make_dataset, sort_reward
from trl_offline.rewards import add_reward_column, compute_rewards, load_reward_funcs


def completion_length(prompts, completions, **kwargs):
    return [float(len(c if isinstance(c, str) else c[-1]["content"])) for c in completions]


def first_letter_is_a(prompts, completions, **kwargs):
    return [1.0 if c.startswith("a") else 0.0 for c in completions]


# Counts the calls of `counted_length`; a module-level function is hashed by its name, so counting does not change
# the fingerprint of the rewards
CALLS = []


def counted_length(prompts, completions, **kwargs):
    CALLS.append(len(completions))
    return [float(len(c)) for c in completions]


def sorting_reward(prompts, completions, **kwargs):
    return [sort_reward(prompt.removesuffix("="), completion) for prompt, completion in zip(prompts, completions)]


def test_callable_reward_on_standard_rows():
    dataset = make_dataset("prompt_completion", num_rows=10)
    rewards = compute_rewards(dataset, completion_length, batch_size=3)
    assert rewards == [float(len(c)) for c in dataset["completion"]]
    # Rewards are kept exactly as returned, not rounded to float32
    dataset = Dataset.from_dict({"prompt": ["cab=", "dcba="], "completion": ["acb", "abcd"]})
    assert compute_rewards(dataset, sorting_reward) == [1 / 3, 1.0]


def test_callable_reward_on_conversational_rows():
    dataset = make_dataset("conversational_prompt_completion", num_rows=10)
    rewards = compute_rewards(dataset, [completion_length], batch_size=4)
    assert rewards == [float(len(c[-1]["content"])) for c in dataset["completion"]]


def test_other_columns_are_passed_as_keyword_arguments():
    dataset = Dataset.from_list(
        [
            {"prompt": "cab=", "completion": "abc", "answer": "abc"},
            {"prompt": "ba=", "completion": "ba", "answer": "ab"},
        ]
    )

    def exact_match(prompts, completions, answer, **kwargs):
        assert prompts == ["cab=", "ba="]
        return [float(c == a) for c, a in zip(completions, answer)]

    assert compute_rewards(dataset, exact_match) == [1.0, 0.0]


def test_weights_combine_functions():
    dataset = Dataset.from_dict({"prompt": ["x=", "y="], "completion": ["abc", "ba"]})
    rewards = compute_rewards(dataset, [completion_length, first_letter_is_a], reward_weights=[0.5, -2.0])
    assert rewards == [0.5 * 3 - 2.0, 0.5 * 2]


def test_none_means_the_function_does_not_apply():
    dataset = Dataset.from_dict(
        {"prompt": ["p"] * 5, "completion": ["a", "bb", "ccc", "dddd", "eeeee"], "task": list("lmlml")}
    )

    def length_task(prompts, completions, task, **kwargs):
        return [float(len(c)) if t == "l" else None for c, t in zip(completions, task)]

    def match_task(prompts, completions, task, **kwargs):
        return [10.0 if t == "m" else None for t in task]

    rewards = compute_rewards(dataset, [length_task, match_task], reward_weights=[1.0, 2.0], batch_size=2)
    assert rewards == [1.0, 20.0, 3.0, 20.0, 5.0]
    with pytest.raises(ValueError, match="Every reward function returned None for row 1"):
        compute_rewards(dataset, [length_task], batch_size=2)


def test_async_reward_function():
    dataset = Dataset.from_dict({"prompt": ["p", "q"], "completion": ["ab", "c"]})

    async def async_length(prompts, completions, **kwargs):
        return [float(len(c)) for c in completions]

    assert compute_rewards(dataset, async_length) == [2.0, 1.0]


def model_scores_one_row_at_a_time(path: str, dataset: Dataset) -> list[float]:
    """The reward model's `logits[:, 0]` on each row alone (no padding), the text built by hand."""
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    scores = []
    for row in dataset:
        if isinstance(row["prompt"], str):
            text = row["prompt"] + row["completion"]
        else:
            text = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
        input_ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            scores.append(model(input_ids=input_ids).logits[0, 0].item())
    return scores


@pytest.mark.parametrize("dataset_format", ["prompt_completion", "conversational_prompt_completion"])
def test_reward_model_from_a_path(reward_model_path, dataset_format):
    dataset = make_dataset(dataset_format, num_rows=7)  # prompts of 3 to 6 letters: batches need padding
    rewards = compute_rewards(dataset, reward_model_path, batch_size=3)
    expected = model_scores_one_row_at_a_time(reward_model_path, dataset)
    assert len(set(rewards)) > 1
    torch.testing.assert_close(torch.tensor(rewards), torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_reward_model_object_with_a_function(reward_model_path):
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_path)
    funcs, tokenizers = load_reward_funcs([model, completion_length])
    assert funcs[0] is model and tokenizers[0].name_or_path == reward_model_path and tokenizers[1] is None
    dataset = make_dataset("prompt_completion", num_rows=4)
    rewards = compute_rewards(dataset, funcs, tokenizers, reward_weights=[1.0, 0.0])
    torch.testing.assert_close(
        torch.tensor(rewards), torch.tensor(model_scores_one_row_at_a_time(reward_model_path, dataset))
    )


def test_model_without_a_path_needs_a_tokenizer(reward_model_path):
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_path)
    model.config.name_or_path = ""
    with pytest.raises(ValueError, match="pass it in `reward_processing_classes`"):
        load_reward_funcs(model)


@pytest.mark.parametrize(
    "returned, match",
    [
        ([1.0], r"'bad_reward' returned 1 rewards for rows 0 to 3, but 4 were expected"),
        (1.0, r"'bad_reward' returned float; expected a list with one reward per row"),
        ([1.0, 2.0, "high", 0.0], r"'bad_reward' returned 'high' \(str\) for row 2"),
        ([1.0, math.nan, 0.0, 0.0], r"'bad_reward' returned a non-finite reward \(nan\) for row 1"),
        ([1.0, 0.0, 0.0, -math.inf], r"'bad_reward' returned a non-finite reward \(-inf\) for row 3"),
    ],
)
def test_bad_rewards_name_the_function_and_the_row(returned, match):
    dataset = Dataset.from_dict({"prompt": ["p"] * 4, "completion": ["c"] * 4})

    def bad_reward(prompts, completions, **kwargs):
        return returned

    with pytest.raises(ValueError, match=match):
        compute_rewards(dataset, bad_reward)


def test_row_numbers_count_across_batches():
    dataset = Dataset.from_dict({"prompt": ["p"] * 6, "completion": ["a", "b", "c", "d", "e", "nan"]})

    def parse(prompts, completions, **kwargs):
        return [float(c) if c == "nan" else 0.0 for c in completions]

    with pytest.raises(ValueError, match="for row 5"):
        compute_rewards(dataset, parse, batch_size=2)


def test_missing_columns_and_weights():
    with pytest.raises(ValueError, match=r"missing \['completion'\]"):
        compute_rewards(Dataset.from_dict({"prompt": ["p"]}), completion_length)
    dataset = Dataset.from_dict({"prompt": ["p"], "completion": ["c"]})
    with pytest.raises(
        ValueError, match=r"Number of reward weights \(1\) must match number of reward functions \(2\)"
    ):
        compute_rewards(dataset, [completion_length, first_letter_is_a], reward_weights=[1.0])


def test_reward_column_is_cached_for_a_dataset_on_disk(tmp_path):
    make_dataset("prompt_completion", num_rows=6).save_to_disk(str(tmp_path / "data"))
    dataset = load_from_disk(str(tmp_path / "data"))
    CALLS.clear()

    first = add_reward_column(dataset, counted_length, batch_size=4)
    assert CALLS == [4, 2]
    assert first["reward"] == [float(len(c)) for c in dataset["completion"]]

    second = add_reward_column(load_from_disk(str(tmp_path / "data")), counted_length, batch_size=4)
    assert CALLS == [4, 2]  # read back from the cache file, not scored again
    assert second["reward"] == first["reward"] and second._fingerprint == first._fingerprint

    # Other weights or another column are other rewards
    add_reward_column(dataset, counted_length, reward_weights=[2.0], batch_size=4)
    add_reward_column(dataset, counted_length, column="score", batch_size=4)
    assert len(CALLS) == 6


def test_reward_column_in_memory_is_computed_each_time():
    dataset = Dataset.from_dict({"prompt": ["p", "q"], "completion": ["ab", "c"]})
    CALLS.clear()
    assert add_reward_column(dataset, counted_length)["reward"] == [2.0, 1.0]
    assert add_reward_column(dataset, counted_length)["reward"] == [2.0, 1.0]
    assert len(CALLS) == 2
    with pytest.raises(ValueError, match="already has a 'reward' column"):
        add_reward_column(dataset.add_column("reward", [0.0, 1.0]), counted_length)
