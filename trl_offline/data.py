"""Dataset checks shared by the trainers: bad input is refused before any training step, naming the column, the row
and what was expected."""

from collections.abc import Iterator

from datasets import Dataset, IterableDataset


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


def check_sft_dataset(dataset: Dataset | IterableDataset, dataset_text_field: str = "text", name: str = "train"):
    """Check a dataset in one of SFT's formats: `text`, `messages`, or `prompt` + `completion`.

    A dataset that is already tokenized (`input_ids`) is left to TRL. Raises `ValueError` or `TypeError` naming the
    column and the row for a missing column, a value of the wrong type, or an empty text or completion.
    """
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
        for row, values in _iter_rows(dataset, ["prompt", "completion"]):
            _check_text_or_messages(values["prompt"], "prompt", row, needs_assistant=False)
            _check_text_or_messages(values["completion"], "completion", row, needs_assistant=True)
            if isinstance(values["prompt"], str) != isinstance(values["completion"], str):
                raise TypeError(
                    f"Row {row} mixes formats: 'prompt' and 'completion' must both be strings or both be lists of "
                    "messages."
                )
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
