import json
import math

import pytest
from datasets import Dataset, IterableDataset

from trl_offline.data import LABEL_REWARDS, to_rewarded_dataset


def _conversation(role, content):
    return [{"role": role, "content": content}]


def test_float_rewards_are_kept_and_integers_become_floats():
    dataset = to_rewarded_dataset(
        Dataset.from_dict({"prompt": ["a", "b"], "completion": ["x", "y"], "reward": [1, -2]})
    )
    assert dataset["reward"] == [1.0, -2.0] and dataset.features["reward"].dtype == "float64"


def test_labels_become_rewards_by_the_documented_rule():
    rows = {"prompt": ["a", "b"], "completion": ["x", "y"], "label": [True, False]}
    assert to_rewarded_dataset(Dataset.from_dict(rows))["reward"] == [LABEL_REWARDS[True], LABEL_REWARDS[False]]
    assert LABEL_REWARDS == {True: 1.0, False: 0.0}


def test_preference_rows_are_unpaired_like_kto():
    dataset = Dataset.from_dict({"prompt": ["p"], "chosen": ["good"], "rejected": ["bad"]})
    rows = to_rewarded_dataset(dataset).to_list()
    assert sorted((r["completion"], r["label"], r["reward"]) for r in rows) == [
        ("bad", False, 0.0),
        ("good", True, 1.0),
    ]
    assert all(r["prompt"] == "p" for r in rows)


def test_conversational_preference_rows_with_an_implicit_prompt():
    user = _conversation("user", "sort cab")
    dataset = Dataset.from_list(
        [{"chosen": user + _conversation("assistant", "abc"), "rejected": user + _conversation("assistant", "cba")}]
    )
    rows = to_rewarded_dataset(dataset).to_list()
    assert [r["prompt"] for r in rows] == [user, user]
    assert sorted(r["completion"][0]["content"] for r in rows) == ["abc", "cba"]


def test_reward_funcs_make_the_reward_column_optional():
    dataset = Dataset.from_dict({"prompt": ["a"], "completion": ["x"]})
    assert to_rewarded_dataset(dataset, requires_reward=False)["completion"] == ["x"]
    with pytest.raises(ValueError, match="no 'reward' or 'label' column, and no `reward_funcs`"):
        to_rewarded_dataset(dataset)


def test_labels_are_left_to_the_reward_funcs():
    dataset = Dataset.from_dict({"prompt": ["a", "b"], "completion": ["x", "y"], "label": [True, False]})
    rows = to_rewarded_dataset(dataset, requires_reward=False)
    assert "reward" not in rows.column_names and rows["label"] == [True, False]


@pytest.mark.parametrize(
    "rows,error,message",
    [
        ({"prompt": ["a"], "reward": [1.0]}, ValueError, r"missing \['completion'\]"),
        ({"prompt": ["a", "b"], "completion": ["x", ""], "reward": [1.0, 2.0]}, ValueError, "Row 1 of column 'completion'"),
        ({"prompt": ["a", "b"], "completion": ["x", "y"], "reward": [1.0, math.nan]}, ValueError, "Row 1 of column 'reward' is not finite"),
        ({"prompt": ["a"], "completion": ["x"], "reward": [math.inf]}, ValueError, "Row 0 of column 'reward' is not finite"),
        ({"prompt": ["a"], "completion": ["x"], "reward": ["high"]}, TypeError, "Row 0 of column 'reward' must be a number"),
        ({"prompt": ["a"], "completion": ["x"], "label": ["yes"]}, TypeError, "Row 0 of column 'label' must be a bool"),
        ({"prompt": ["a"], "chosen": ["x"]}, ValueError, "only one of 'chosen' and 'rejected'"),
        ({"prompt": ["a"], "chosen": ["x"], "rejected": ["y"], "completion": ["z"]}, ValueError, "mixes preference"),
        ({"prompt": ["a"], "completion": [3], "reward": [1.0]}, TypeError, "Row 0 of column 'completion'"),
    ],
)  # fmt: skip
def test_bad_rows_are_refused_naming_column_and_row(rows, error, message):
    with pytest.raises(error, match=message):
        to_rewarded_dataset(Dataset.from_dict(rows))


def test_only_a_datasets_dataset_is_accepted():
    with pytest.raises(TypeError, match="datasets.Dataset"):
        to_rewarded_dataset([{"prompt": "a", "completion": "x", "reward": 1.0}])


def test_tools_and_template_arguments_survive_unpairing_and_labels():
    user = _conversation("user", "sort cab")
    tools = json.dumps([{"type": "function", "function": {"name": "sort_letters"}}])
    dataset = Dataset.from_list(
        [
            {
                "prompt": user,
                "chosen": _conversation("assistant", "abc"),
                "rejected": _conversation("assistant", "cba"),
                "tools": tools,
                "chat_template_kwargs": {"enable_thinking": True},
            }
        ]
    )
    rows = to_rewarded_dataset(dataset).to_list()
    assert [(r["reward"], r["tools"], r["chat_template_kwargs"]) for r in rows] == [
        (1.0, tools, {"enable_thinking": True}),
        (0.0, tools, {"enable_thinking": True}),
    ]


@pytest.mark.parametrize(
    "tools,error,message",
    [
        ('{"name": "sort"}', TypeError, "Row 1 of column 'tools' must be a list of tools"),
        ("[{", ValueError, "Row 1 of column 'tools' is a string but not valid JSON"),
    ],
)
def test_bad_tools_are_refused_naming_the_row(tools, error, message):
    dataset = Dataset.from_dict(
        {
            "prompt": [_conversation("user", "a"), _conversation("user", "b")],
            "completion": [_conversation("assistant", "a"), _conversation("assistant", "b")],
            "reward": [1.0, 0.0],
            "tools": ["[]", tools],
        }
    )
    with pytest.raises(error, match=message):
        to_rewarded_dataset(dataset)


def test_template_columns_on_standard_rows_are_warned_about(caplog):
    rows = {"prompt": ["a"], "completion": ["x"], "reward": [1.0], "chat_template_kwargs": [{"enable_thinking": True}]}
    to_rewarded_dataset(Dataset.from_dict(rows))
    assert "['chat_template_kwargs'] but its rows are standard" in caplog.text


def test_streamed_rows_are_checked_as_they_stream():
    # A stream cannot be read before training: its first row is checked up front, every row as it streams
    good = {"prompt": "a=", "completion": "a", "label": True}
    stream = Dataset.from_list([good, {**good, "completion": " "}]).to_iterable_dataset()
    rewarded = to_rewarded_dataset(stream)
    with pytest.raises(ValueError, match="Row 1 of column 'completion' is an empty string"):
        list(rewarded)

    def mixed_labels():  # a stream of JSON lines can mix types, which Arrow would not store
        yield from (good, {**good, "label": 1})

    with pytest.raises(TypeError, match="Row 1 of column 'label' must be a bool"):
        list(to_rewarded_dataset(IterableDataset.from_generator(mixed_labels)))
    rewards = [{"prompt": "a=", "completion": "a", "reward": r} for r in (1, float("inf"))]
    with pytest.raises(ValueError, match="Row 1 of column 'reward' is not finite"):
        list(to_rewarded_dataset(Dataset.from_list(rewards).to_iterable_dataset()))
    assert [row["reward"] for row in to_rewarded_dataset(Dataset.from_list([good]).to_iterable_dataset())] == [1.0]
