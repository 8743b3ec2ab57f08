"""Dataset checks shared by the trainers: bad input is refused before any training step, naming the column, the row
and what was expected."""

import json
import math
from collections.abc import Iterator

from datasets import Dataset, IterableDataset, Value
from transformers.utils import logging
from trl import is_conversational
from trl.data_utils import get_dataset_column_names, maybe_extract_prompt, unpair_preference_dataset


logger = logging.get_logger(__name__)

# Columns TRL's trainers pass to the chat template of conversational rows, beside the messages
TEMPLATE_COLUMNS = ("tools", "chat_template_kwargs")


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


def map_kwargs(dataset: Dataset | IterableDataset, num_proc: int | None = None, desc: str | None = None) -> dict:
    """`map`/`filter` keyword arguments that only a map-style dataset takes (an `IterableDataset` maps lazily)."""
    return {"num_proc": num_proc, "desc": desc} if isinstance(dataset, Dataset) else {}


def _check_rewarded_row(row: dict, index: int) -> dict:
    """Every streamed row, as it streams: the checks a map-style dataset gets up front."""
    for column, value in (("prompt", row["prompt"]), ("completion", row["completion"])):
        _check_text_or_messages(value, column, index, needs_assistant=column == "completion")
    if "reward" in row:
        _check_reward(row["reward"], index)
    return {}


def _check_reward(reward, row: int) -> None:
    if isinstance(reward, bool) or not isinstance(reward, (int, float)):
        raise TypeError(f"Row {row} of column 'reward' must be a number, got {type(reward).__name__}.")
    if not math.isfinite(reward):
        raise ValueError(f"Row {row} of column 'reward' is not finite ({reward}).")


def to_rewarded_dataset(
    dataset: Dataset | IterableDataset,
    *,
    requires_reward: bool = True,
    name: str = "train",
    num_proc: int | None = None,
) -> Dataset | IterableDataset:
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
    type, an empty completion, or a non-numeric or non-finite reward. An `IterableDataset` (streaming) has its first
    row checked now and every row as it streams.
    """
    if not isinstance(dataset, Dataset | IterableDataset):
        raise TypeError(f"The {name} dataset must be a `datasets.Dataset`, got {type(dataset).__name__}.")
    columns = set(get_dataset_column_names(dataset))
    if {"chosen", "rejected"} & columns:
        if not {"chosen", "rejected"} <= columns:
            raise ValueError(f"The {name} dataset has only one of 'chosen' and 'rejected'; preference rows need both.")
        if "completion" in columns:
            raise ValueError(
                f"The {name} dataset mixes preference columns ('chosen', 'rejected') with 'completion'; use one format."
            )
        if "prompt" not in columns:
            dataset = dataset.map(maybe_extract_prompt, **map_kwargs(dataset, num_proc, f"Extracting {name} prompts"))
        dataset = unpair_preference_dataset(dataset, **map_kwargs(dataset, num_proc, f"Unpairing {name} dataset"))
        columns = set(get_dataset_column_names(dataset))
    missing = {"prompt", "completion"} - columns
    if missing:
        raise ValueError(
            f"The {name} dataset has columns {sorted(columns)}; expected 'prompt' and 'completion' (missing "
            f"{sorted(missing)}), or 'chosen' and 'rejected'."
        )
    _check_prompt_completion_rows(dataset)
    check_template_columns(dataset, name)
    if isinstance(dataset, IterableDataset):
        dataset = dataset.map(_check_rewarded_row, with_indices=True)

    if "reward" in columns:
        for row, values in _iter_rows(dataset, ["reward"]):
            _check_reward(values["reward"], row)
        if isinstance(dataset, IterableDataset):  # its features may be unknown until it streams
            return dataset.map(lambda row: {"reward": float(row["reward"])})
        if dataset.features["reward"].dtype == "float64":
            return dataset
        return dataset.cast_column("reward", Value("float64"))
    if "label" in columns and requires_reward:
        if isinstance(dataset, IterableDataset):
            dataset = dataset.map(_check_label, with_indices=True)
        for row, values in _iter_rows(dataset, ["label"]):
            _check_label(values, row)
        return dataset.map(lambda row: {"reward": LABEL_REWARDS[row["label"]]}, **map_kwargs(dataset, num_proc))
    if requires_reward:
        raise ValueError(
            f"The {name} dataset has no 'reward' or 'label' column, and no `reward_funcs` were given to score it."
        )
    return dataset


def _check_label(row: dict, index: int) -> dict:
    if not isinstance(row["label"], bool):
        raise TypeError(f"Row {index} of column 'label' must be a bool, got {type(row['label']).__name__}.")
    return {}


def _parse_tools(value, row: int):
    """A row's `tools`: a list, or a JSON string of one (as `KTOTrainer` and `SFTTrainer` take them), or `None`."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"Row {row} of column 'tools' is a string but not valid JSON: {error}.") from None
    if value is not None and not isinstance(value, list):
        raise TypeError(
            f"Row {row} of column 'tools' must be a list of tools (or a JSON string of one), got "
            f"{type(value).__name__}."
        )
    return value


def check_template_columns(dataset: Dataset | IterableDataset, name: str = "train") -> None:
    """Check the `tools` and `chat_template_kwargs` columns, if any: a list of tools (or its JSON string) and a dict
    per row, or `None`. On standard rows no chat template is applied, so they have no effect: warned about."""
    present = [column for column in TEMPLATE_COLUMNS if column in get_dataset_column_names(dataset)]
    if not present:
        return
    for row, values in _iter_rows(dataset, present):
        if "tools" in values:
            _parse_tools(values["tools"], row)
        kwargs = values.get("chat_template_kwargs")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise TypeError(
                f"Row {row} of column 'chat_template_kwargs' must be a dict of chat template arguments, got "
                f"{type(kwargs).__name__}."
            )
    if not is_conversational(next(iter(dataset))):
        logger.warning(
            f"The {name} dataset has {present} but its rows are standard (text), not conversational: no chat template "
            "is applied to them, so these columns have no effect (as in TRL's trainers)."
        )


def chat_template_kwargs(row: dict) -> dict:
    """What TRL's trainers pass to the chat template of a conversational row besides the messages: its `tools`
    (parsed from JSON if a string) and its `chat_template_kwargs`."""
    tools = row.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools  # checked by `check_template_columns`
    return {"tools": tools, **(row.get("chat_template_kwargs") or {})}


def drop_long_prompts(
    dataset: Dataset | IterableDataset, max_length: int, name: str = "train", num_proc: int | None = None
) -> Dataset | IterableDataset:
    """Drop the tokenized rows whose `prompt_ids` fill `max_length`, as `KTOTrainer` filters them (truncating from
    the right would leave them no completion token to learn from), with a warning that counts them. Raises
    `ValueError` when no row is left. A streamed dataset is filtered as it streams, uncounted."""
    if isinstance(dataset, IterableDataset):
        return dataset.filter(lambda ids: len(ids) < max_length, input_columns="prompt_ids")
    too_long, start = [], 0
    for batch in dataset.select_columns(["prompt_ids"]).iter(batch_size=10_000):
        too_long += [start + i for i, ids in enumerate(batch["prompt_ids"]) if len(ids) >= max_length]
        start += len(batch["prompt_ids"])
    if not too_long:
        return dataset
    if len(too_long) == len(dataset):
        raise ValueError(
            f"Every row of the {name} dataset ({len(dataset)}) has a prompt of `max_length={max_length}` tokens or "
            "more, leaving no room for a completion: there is nothing left to train on. Raise `max_length` or "
            "shorten the prompts."
        )
    logger.warning(
        f"Dropped {len(too_long)} of the {len(dataset)} rows of the {name} dataset (rows {too_long[:10]}"
        f"{', ...' if len(too_long) > 10 else ''}): their prompts have `max_length={max_length}` tokens or more, "
        "leaving no room for a completion. Raise `max_length` to keep them."
    )
    return dataset.filter(
        lambda ids: len(ids) < max_length,
        input_columns="prompt_ids",
        num_proc=num_proc,
        desc=f"Dropping the {name} rows whose prompts fill max_length",
    )
