"""Passes over a whole dataset before training (reference log-probabilities, values, prompt features, generations,
reward scoring), split across processes with accelerate's own pieces.

Every pass goes through [`shard_batches`]: the row indices `0 .. N - 1` in a DataLoader prepared by accelerate, so each
process takes its share of batches and every process runs the same number of them (the last round repeats rows from
the start, as accelerate's `even_batches` does), which ZeRO-3's collective forwards need; and `gather_for_metrics`
tells, at every step, which rows are real and where they go. [`map_rows`] gathers the per-row results of a pass in row
order on every process; a pass whose results must stay where they were computed (A-LoL's prompt features) iterates
[`shard_batches`] itself and keeps the rows its process holds.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader
from tqdm.auto import tqdm


@dataclass
class ShardBatch:
    """One step of a distributed pass, as one process sees it.

    Attributes:
        indices: The rows this process computes at this step (the last step may repeat earlier rows).
        num_real: How many of `indices`, from the start, are rows of this step rather than repeats.
        step_rows: The rows of this step over every process, in row order (the same on every process).
    """

    indices: list[int]
    num_real: int
    step_rows: list[int]


def shard_batches(
    accelerator: Accelerator, num_rows: int, batch_size: int, desc: str | None = None, disable_tqdm: bool = False
) -> Iterator[ShardBatch]:
    """The batches of a pass over rows `0 .. num_rows - 1`, this process's share, with a progress bar (rows per
    second) on the main process.

    Every process gets the same number of batches; a failure on one process is raised on every process after the
    step, so the others do not wait for it forever (a forward that fails half-way under ZeRO-3 still cannot be
    rescued).
    """
    if num_rows < 1:
        raise ValueError(f"Nothing to compute: {desc or 'the pass'} has no rows.")
    loader = prepare_data_loader(
        DataLoader(range(num_rows), batch_size=batch_size, shuffle=False),
        num_processes=accelerator.num_processes,
        process_index=accelerator.process_index,
        split_batches=False,
        put_on_device=False,
        even_batches=True,
    )
    rank = accelerator.process_index
    progress = tqdm(
        total=num_rows, desc=desc, unit="rows", disable=disable_tqdm or not accelerator.is_main_process, leave=False
    )
    with progress:
        for indices in loader:
            indices = indices.tolist()
            # (row, process) of every entry: after `gather_for_metrics` drops the repeats of the last step, an entry
            # of this process that is left is a real row
            tagged = torch.tensor([[row, rank] for row in indices], device=accelerator.device)  # (b, 2)
            gathered = accelerator.gather_for_metrics(tagged).cpu()  # (real rows of the step, 2)
            num_real = int((gathered[:, 1] == rank).sum())
            step = ShardBatch(indices, num_real, gathered[:, 0].tolist())
            yield step
            progress.update(len(step.step_rows))


def raise_if_any_failed(accelerator: Accelerator, error: BaseException | None, desc: str) -> None:
    """Raises `error` on the process it happened on, and a pointer to it on every other one."""
    failed = accelerator.gather(torch.tensor([error is not None], device=accelerator.device)).cpu()  # (P,)
    if error is not None:
        raise error
    if bool(failed.any()):
        ranks = failed.nonzero().flatten().tolist()
        raise RuntimeError(f"{desc} failed on process(es) {ranks}; the error is in that process's output.")


PerRow = torch.Tensor | list[torch.Tensor] | list


def map_rows(
    accelerator: Accelerator,
    num_rows: int,
    fn: Callable[[list[int]], dict[str, PerRow]],
    batch_size: int,
    desc: str | None = None,
    disable_tqdm: bool = False,
) -> dict[str, list]:
    """`fn` over rows `0 .. num_rows - 1` in batches split across processes; the results of every row, in row order,
    on every process.

    `fn(indices)` returns a dict of per-row results for its rows, each one of: a `(b,)` tensor (a float per row), a
    list of `b` 1-D tensors of any lengths (e.g. per-token log-probabilities), or a list of `b` Python objects (e.g.
    generated texts). The result has, for each key, a list of `num_rows` entries: floats, lists of floats, or the
    objects.
    """
    columns: dict[str, list] = {}
    for step in shard_batches(accelerator, num_rows, batch_size, desc, disable_tqdm):
        error, outputs = None, {}
        try:
            outputs = fn(step.indices)
        except Exception as e:  # raised below on this process, after every process has reported
            error = e
        raise_if_any_failed(accelerator, error, desc or "A pass over the dataset")
        for key, values in outputs.items():
            gathered = _gather_per_row(accelerator, values)
            column = columns.setdefault(key, [None] * num_rows)
            for row, value in zip(step.step_rows, gathered):
                column[row] = value
    return columns


def _gather_per_row(accelerator: Accelerator, values: PerRow) -> list:
    """The real rows of one step over every process, in the order of `ShardBatch.step_rows`."""
    if isinstance(values, torch.Tensor):
        return accelerator.gather_for_metrics(values.to(accelerator.device)).cpu().tolist()
    if values and all(isinstance(v, torch.Tensor) for v in values):
        lengths = torch.tensor([len(v) for v in values], device=accelerator.device)  # (b,)
        padded = torch.nn.utils.rnn.pad_sequence([v.float() for v in values], batch_first=True)  # (b, L)
        padded = accelerator.pad_across_processes(padded.to(accelerator.device), dim=1)  # (b, L_max)
        padded, lengths = accelerator.gather_for_metrics((padded, lengths))
        return [row[:n].tolist() for row, n in zip(padded.cpu(), lengths.cpu().tolist())]
    return accelerator.gather_for_metrics(list(values), use_gather_object=True)
