"""What a resumed [`OfflineRLTrainer`] reuses of the precompute (A-LoL's value head and rows, DRO's reward statistics):
saved as `PRECOMPUTE_FILE` in `output_dir` and every checkpoint, put back when training resumes from one."""

import os

import torch
from datasets import Dataset, IterableDataset
from datasets.fingerprint import Hasher
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging


logger = logging.get_logger(__name__)

PRECOMPUTE_FILE = "precompute_state.pt"  # in `output_dir` and every checkpoint: what a resume reuses
# What stands for a streamed dataset where its rows must be summed up before training (statistics, a fingerprint)
STREAM_SAMPLE_ROWS = 1000


class ResumeMixin:
    """Saves the precompute state with every checkpoint and reloads it on `train(resume_from_checkpoint=...)`.
    Subclasses say what the state is (`precompute_state`, `load_precompute_state`)."""

    def precompute_state(self) -> dict:
        """What the precompute decided and training depends on (e.g. A-LoL's value head and rows, DRO's reward
        statistics), saved in `output_dir` and every checkpoint; a resume reuses it rather than computing it again,
        which on a GPU is not bit for bit the same. Tensors, numbers and strings only."""
        return {}

    def load_precompute_state(self, state: dict) -> None:
        """Puts back what `precompute_state` returned."""

    def data_fingerprint(self, dataset: Dataset) -> str:
        """A hash of the rows the precompute read (their tokens, and their rewards unless `reward_funcs` computed
        them), the same in every run on the same data, in memory or not: a resume checks it before it reuses a
        checkpoint's precompute state. A stream is known by its first `STREAM_SAMPLE_ROWS` rows."""
        columns = ["prompt_ids", "completion_ids"] + (["reward"] if self.reward_funcs is None else [])
        if isinstance(dataset, IterableDataset):
            dataset = dataset.take(STREAM_SAMPLE_ROWS)
        hasher = Hasher()
        for batch in dataset.select_columns(columns).iter(batch_size=10_000):  # never every row at once
            hasher.update(batch)
        return hasher.hexdigest()

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        path = os.path.join(checkpoint, PRECOMPUTE_FILE) if isinstance(checkpoint, str) else None
        if path is not None and os.path.isfile(path):
            self.load_precompute_state(torch.load(path, map_location="cpu", weights_only=True))
            logger.info(f"Resuming with the precompute state of {checkpoint}.")
        return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict=state_dict)
        state = self.precompute_state()
        if state and self.args.should_save:
            torch.save(state, os.path.join(output_dir or self.args.output_dir, PRECOMPUTE_FILE))
