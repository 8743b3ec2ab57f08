"""The passes [`OfflineRLTrainer`] makes over a whole dataset before training: the frozen reference (a `ref_model`, or
the model before training, in a DeepSpeed inference engine as TRL's `KTOTrainer` builds one), its forwards, the rows
split across processes, and the columns they compute cached beside a file-backed dataset."""

import contextlib
import json
import os
import shutil
from collections.abc import Callable

import torch
from accelerate.utils import broadcast_object_list, is_peft_model
from datasets import Dataset, concatenate_datasets
from datasets.fingerprint import Hasher
from transformers.utils import logging
from trl.models import prepare_deepspeed

from ._trl_compat import (
    add_fused_lm_head,
    disable_dropout_in_model,
    disable_gradient_checkpointing,
    hash_module,
    use_adapter,
)
from .precompute import map_rows


logger = logging.get_logger(__name__)


class ReferencePassesMixin:
    """Reference passes of [`OfflineRLTrainer`] over a dataset, before training, under DDP and DeepSpeed ZeRO-3.

    The trainer sets `_reference_disables_adapters` (the reference is the model with its new adapter disabled) and
    `precompute_metrics` (what the passes measured, cached with their columns).
    """

    def _prepare_reference(self, ref_model, args) -> None:
        """`ref_model` (if any) as `KTOTrainer` prepares it: TRL's fused LM head, no dropout, and an inference engine
        under DeepSpeed or accelerate's evaluation-mode wrapping otherwise."""
        self.ref_model = ref_model
        self._reference_engine = None
        if ref_model is None:
            return
        add_fused_lm_head(ref_model)
        if args.disable_dropout:
            disable_dropout_in_model(ref_model)
        if self.is_deepspeed_enabled:
            self.ref_model = prepare_deepspeed(ref_model, self.accelerator)
        else:
            self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)

    @contextlib.contextmanager
    def reference_model(self):
        """The frozen reference, ready for forwards: `ref_model` if given, else the model as it is before training
        (adapters disabled when the trainer created them). Under DeepSpeed the parameters are not placed (ZeRO-1/2)
        or are sharded (ZeRO-3) until `train()`, so an inference engine is built once, as TRL's `KTOTrainer` does."""
        if self.state.global_step > 0 and self.ref_model is None and not self._reference_disables_adapters:
            raise RuntimeError(
                "The reference is the model before training, which is gone once training has started: pass a "
                "`ref_model`, or give the trainer every dataset it scores before `train()`."
            )
        if self.ref_model is not None:
            model = self.ref_model
        elif self.is_deepspeed_enabled and self.deepspeed is None:  # not yet training: no engine holds the model
            if self._reference_engine is None:
                self._reference_engine = prepare_deepspeed(self.model, self.accelerator)
            model = self._reference_engine
        else:
            model = self.model
        adapters = contextlib.nullcontext()
        if self._reference_disables_adapters:
            adapters = use_adapter(self.accelerator.unwrap_model(self.model), adapter_name=None)
        was_training = model.training
        model.eval()
        try:
            with (
                torch.no_grad(),
                disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
                adapters,
                self.accelerator.autocast(),
            ):
                yield model
        finally:
            model.train(was_training)

    def reference_cache_key(self, dataset: Dataset, *settings) -> str:
        """The fingerprint under which `cached_columns` keeps reference passes over `dataset`: the data, the reference's
        checkpoint name and weights, and `settings`. In-memory datasets are never cached, so their weights are not
        hashed (hashing reads every weight)."""
        if not dataset.cache_files:
            return "not cached"
        reference = self.ref_model if self.ref_model is not None else self.model
        # ZeRO-3 has already sharded the weights the hash reads, so the checkpoint's name is part of the key too
        model_id = (self.accelerator.unwrap_model(reference).config._name_or_path, hash_module(reference))
        return Hasher.hash((dataset._fingerprint, model_id, *settings))

    def release_reference_engine(self) -> None:
        """Takes down the DeepSpeed inference engine of the reference passes, once they are done: its hooks would
        otherwise stay on the model beside the training engine's, gathering ZeRO-3 shards twice, and its threads would
        outlive the process group at exit. `reference_model` builds it again if it is needed before training."""
        self._backbone_of = (None, None)  # no reference kept to a model the passes are done with
        if self._reference_engine is not None:
            self._reference_engine.destroy()
            self._reference_engine = None

    def backbone(self, model) -> torch.nn.Module:
        """The transformer body (last hidden states) of `model`, under any wrapper. Looked up once per model: the
        passes ask for it on every batch, and unwrapping costs milliseconds."""
        cached_model, body = getattr(self, "_backbone_of", (None, None))
        if cached_model is not model:
            unwrapped = self.accelerator.unwrap_model(model)
            if is_peft_model(unwrapped):
                unwrapped = unwrapped.get_base_model()
            body = unwrapped.base_model
            self._backbone_of = (model, body)
        return body

    def map_rows(self, num_rows: int, fn: Callable[[list[int]], dict], batch_size: int, desc: str) -> dict[str, list]:
        """`fn` over rows `0 .. num_rows - 1`, split across processes; every row's results, in order, on every process
        (see [`trl_offline.precompute.map_rows`])."""
        return map_rows(self.accelerator, num_rows, fn, batch_size, desc, disable_tqdm=self.args.disable_tqdm)

    def collate_rows(self, rows: Dataset, indices: list[int]) -> dict[str, torch.Tensor]:
        """Rows `indices` of a dataset with `prompt_ids` and `completion_ids`, collated as training collates them."""
        batch = rows[indices]
        pairs = zip(batch["prompt_ids"], batch["completion_ids"])
        return self.data_collator([{"prompt_ids": p, "completion_ids": c} for p, c in pairs])

    def reference_forward(self, model, batch: dict[str, torch.Tensor], hidden_states: bool = False):
        """Per-token log-probabilities `(B, T - 1)` of each row's completion under `model` (TRL's fused LM head;
        zero off the completion) and their mask; with `hidden_states`, also the last hidden states `(B, T, H)` of the
        same forward, captured from the transformer body (so prompt features cost no second pass)."""
        batch = {k: v.to(self.accelerator.device) for k, v in batch.items()}
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        captured = []
        hook = None
        if hidden_states:
            hook = self.backbone(model).register_forward_hook(
                lambda module, args, output: captured.append(output.last_hidden_state)
            )
        try:
            logps = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                labels=labels,
                fused_lm_head=True,
            ).log_probs  # (B, T - 1)
        finally:
            if hook is not None:
                hook.remove()
        logps = logps[:, -(batch["input_ids"].shape[1] - 1) :]  # prompt-learning PEFT prepends virtual tokens
        mask = batch["completion_mask"][:, 1:]  # (B, T - 1)
        if not hidden_states:
            return logps.float(), mask
        return logps.float(), mask, captured[-1][:, -batch["input_ids"].shape[1] :]  # (B, T, H)

    def cached_columns(
        self,
        dataset: Dataset,
        fingerprint: str,
        compute: Callable[[], dict[str, list]],
        save_state: Callable[[str], None] | None = None,
        load_state: Callable[[str], None] | None = None,
    ) -> Dataset:
        """`dataset` with the columns `compute()` returns, cached beside a file-backed dataset under `fingerprint`
        (the same on every process), so a rerun on the same data and model skips the reference passes.

        What `compute` puts in `self.precompute_metrics` is cached with the columns, and so is any state it builds
        (e.g. a fitted value head) through `save_state(path)` and `load_state(path)`. In-memory datasets are not
        cached: `datasets` gives them no cache folder.
        """
        fingerprint = broadcast_object_list([fingerprint], from_process=0)[0]
        cache_file = dataset._get_cache_file_path(fingerprint) if dataset.cache_files else None
        if cache_file is not None and os.path.exists(cache_file):
            with open(cache_file + ".json") as f:
                self.precompute_metrics.update(json.load(f))
            if load_state is not None:
                load_state(cache_file + ".state")
            logger.info(f"Loaded the reference passes from the cache {cache_file}.")
            cached = Dataset.from_file(cache_file)
        else:
            columns = compute()
            if cache_file is not None and self.accelerator.is_main_process:
                if save_state is not None:
                    save_state(cache_file + ".state")
                with open(cache_file + ".json", "w") as f:
                    json.dump(self.precompute_metrics, f)
                # Written under another name and moved, so a crash never leaves a truncated cache behind
                Dataset.from_dict(columns).map(cache_file_name=cache_file + ".tmp", new_fingerprint=fingerprint)
                shutil.move(cache_file + ".tmp", cache_file)
            self.accelerator.wait_for_everyone()
            cached = Dataset.from_dict(columns)
        drop = [c for c in cached.column_names if c in dataset.column_names]
        return concatenate_datasets([dataset.remove_columns(drop), cached], axis=1)
