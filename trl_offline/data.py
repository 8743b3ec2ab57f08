"""Dataset checks shared by the trainers: bad input is refused before any training step, naming the column, the row
and what was expected."""

import math
from collections.abc import Iterator

from datasets import Dataset, IterableDataset, Value
from trl.data_utils import maybe_extract_prompt, unpair_preference_dataset


def _iter_rows(dataset: Dataset | IterableDataset, columns: list[str]) -> Iterator[tuple[int, dict]]:
    """Rows of `columns`, read in batches. An `IterableDataset` is only sampled: its first row is checked."""
    if isinstance(dataset, IterableDataset):
        row = next(iter(dataset.select_columns(columns)))
        yield 0, row
        return
    start = 0
    for batch in dataset.select_columns(columns).iter(batch_size=1024):
        size = len(batch[columns[0]])
        for offset in range(size):
            yield start + offset, {column: batch[column][offset] for column in columns}
        start += size


def _is_messages(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def _check_text_or_messages(value, column: str, row: int, *, needs_assistant: bool) -> None:
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"Row {row} of column '{column}' is an empty string.")
    elif _is_messages(value):
        if not value:
            raise ValueError(f"Row {row} of column '{column}' is an empty list of messages.")
        if needs_assistant:
            replies = [m["content"] for m in value if m["role"] == "assistant"]
            if not replies or not any(isinstance(c, str) and c.strip() for c in replies):
                raise ValueError(f"Row {row} of column '{column}' has no non-empty assistant message.")
    else:
        raise TypeError(
            f"Row {row} of column '{column}' must be a string or a list of messages "
            f"({{'role': ..., 'content': ...}}), got {type(value).__name__}."
        )


def _check_prompt_completion_rows(dataset: Dataset | IterableDataset) -> None:
    for row, values in _iter_rows(dataset, ["prompt", "completion"]):
        _check_text_or_messages(values["prompt"], "prompt", row, needs_assistant=False)
        _check_text_or_messages(values["completion"], "completion", row, needs_assistant=True)
        if isinstance(values["prompt"], str) != isinstance(values["completion"], str):
            raise TypeError(
                f"Row {row} mixes formats: 'prompt' and 'completion' must both be strings or both be lists of "
                "messages."
            )


def check_sft_dataset(dataset: Dataset | IterableDataset, dataset_text_field: str = "text", name: str = "train"):
    """Check a dataset in one of SFT's formats: `text`, `messages`, or `prompt` + `completion`.

    A dataset that is already tokenized (`input_ids`) is left to TRL. Raises `ValueError` or `TypeError` naming the
    column and the row for a missing column, a value of the wrong type, or an empty text or completion.
    """
    if isinstance(dataset, Dataset) and len(dataset) == 0:
        raise ValueError(f"The {name} dataset is empty: there is nothing to train or evaluate on.")
    columns = set(dataset.column_names or [])
    if "input_ids" in columns:
        return
    if "prompt" in columns or "completion" in columns:
        missing = {"prompt", "completion"} - columns
        if missing:
            raise ValueError(
                f"The {name} dataset has a '{({'prompt', 'completion'} - missing).pop()}' column but no "
                f"'{missing.pop()}' column: prompt-completion rows need both."
            )
        _check_prompt_completion_rows(dataset)
        return
    if "messages" in columns:
        for row, values in _iter_rows(dataset, ["messages"]):
            if not _is_messages(values["messages"]):
                raise TypeError(
                    f"Row {row} of column 'messages' must be a list of messages ({{'role': ..., 'content': ...}}), "
                    f"got {type(values['messages']).__name__}."
                )
            _check_text_or_messages(values["messages"], "messages", row, needs_assistant=True)
        return
    if dataset_text_field in columns:
        for row, values in _iter_rows(dataset, [dataset_text_field]):
            _check_text_or_messages(values[dataset_text_field], dataset_text_field, row, needs_assistant=False)
        return
    raise ValueError(
        f"The {name} dataset has columns {sorted(columns)}; expected '{dataset_text_field}', 'messages', or "
        "'prompt' and 'completion'."
    )


# Rewarded rows, for the trainers that learn from a score per response (A-LoL, DRO)

# How a KTO-style thumbs-up/down label becomes a reward. Any affine map gives the same training: A-LoL subtracts a
# value fit to these rewards and DRO standardises them by default.
LABEL_REWARDS = {True: 1.0, False: 0.0}


def to_rewarded_dataset(
    dataset: Dataset, *, requires_reward: bool = True, name: str = "train", num_proc: int | None = None
) -> Dataset:
    """Normalise a dataset to `prompt` + `completion` rows with a float `reward`, checking every row.

    Accepted, standard or conversational:
    - `prompt`, `completion`, `reward` (a finite number): kept as is.
    - `prompt`, `completion`, `label` (bool, KTO's unpaired format): `reward = LABEL_REWARDS[label]`, i.e. 1.0 for a
      thumbs up and 0.0 for a thumbs down.
    - `chosen`, `rejected` (and `prompt`, or a prompt implicit in both): unpaired as `KTOTrainer` does, each chosen
      response labelled True and each rejected one False, then as above.
    With `requires_reward=False` (rewards come from `reward_funcs` instead), rows need neither `reward` nor `label`,
    and a `label` column is kept as it is, not turned into rewards.
    A dataset with both `reward` and `label` uses `reward`.

    Raises `ValueError`/`TypeError` naming the column and row for a missing or mixed column, a value of the wrong
    type, an empty completion, or a non-numeric or non-finite reward.
    """
    if not isinstance(dataset, Dataset):
        raise TypeError(f"The {name} dataset must be a `datasets.Dataset`, got {type(dataset).__name__}.")
    columns = set(dataset.column_names)
    if {"chosen", "rejected"} & columns:
        if not {"chosen", "rejected"} <= columns:
            raise ValueError(f"The {name} dataset has only one of 'chosen' and 'rejected'; preference rows need both.")
        if "completion" in columns:
            raise ValueError(
                f"The {name} dataset mixes preference columns ('chosen', 'rejected') with 'completion'; use one format."
            )
        if "prompt" not in columns:
            dataset = dataset.map(
                maybe_extract_prompt, num_proc=num_proc, desc=f"Extracting prompts of {name} dataset"
            )
        dataset = unpair_preference_dataset(dataset, num_proc=num_proc, desc=f"Unpairing {name} dataset")
        columns = set(dataset.column_names)
    missing = {"prompt", "completion"} - columns
    if missing:
        raise ValueError(
            f"The {name} dataset has columns {sorted(columns)}; expected 'prompt' and 'completion' (missing "
            f"{sorted(missing)}), or 'chosen' and 'rejected'."
        )
    _check_prompt_completion_rows(dataset)

    if "reward" in columns:
        for row, values in _iter_rows(dataset, ["reward"]):
            reward = values["reward"]
            if isinstance(reward, bool) or not isinstance(reward, (int, float)):
                raise TypeError(f"Row {row} of column 'reward' must be a number, got {type(reward).__name__}.")
            if not math.isfinite(reward):
                raise ValueError(f"Row {row} of column 'reward' is not finite ({reward}).")
        return (
            dataset
            if dataset.features["reward"].dtype == "float64"
            else dataset.cast_column("reward", Value("float64"))
        )
    if "label" in columns and requires_reward:
        for row, values in _iter_rows(dataset, ["label"]):
            if not isinstance(values["label"], bool):
                raise TypeError(f"Row {row} of column 'label' must be a bool, got {type(values['label']).__name__}.")
        return dataset.map(lambda row: {"reward": LABEL_REWARDS[row["label"]]}, num_proc=num_proc)
    if requires_reward:
        raise ValueError(
            f"The {name} dataset has no 'reward' or 'label' column, and no `reward_funcs` were given to score it."
        )
    return dataset
