"""What the trainers that learn from scored responses (A-LoL, DRO) share: TRL's `KTOTrainer` set-up (model as a path
or an object, tokenizer, PEFT, a frozen reference, the fused LM head), rows normalised to prompt + completion + reward,
their tokenization and collation, and reference passes over a whole dataset before training that work under DDP and
DeepSpeed ZeRO-3.

The pieces live in files of their own, one job each, and [`OfflineRLTrainer`] puts them together:
- [`trl_offline.model_setup`]: config, model, tokenizer and PEFT set-up, as `KTOTrainer` does it;
- [`trl_offline.tokenization`]: rows normalised and tokenized as `KTOTrainer` tokenizes them;
- [`trl_offline.reward_scoring`]: rewards from `reward_funcs`, scored once before training;
- [`trl_offline.reference_passes`]: the frozen reference and the passes over a dataset before training, cached;
- [`trl_offline.resume`]: what a resume reuses of the precompute;
- [`trl_offline.row_metrics`]: per-row metrics and evaluation predictions.
This file keeps the constructor, the dataset checks, the MoE auxiliary loss, the training step and the model card."""

import contextlib
import functools
from collections.abc import Callable

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from transformers import PreTrainedTokenizerBase, TrainerCallback, TrainingArguments, set_seed
from trl.models import get_act_offloading_ctx_manager

from ._trl_compat import BaseTrainer, add_fused_lm_head, disable_dropout_in_model
from .collator import DataCollatorForRewardedCompletions
from .model_card import model_card_name, write_model_card
from .model_setup import ModelSetupMixin
from .quantization import is_quantized, keep_4bit_layers_differentiable
from .reference_passes import ReferencePassesMixin
from .resume import PRECOMPUTE_FILE, STREAM_SAMPLE_ROWS, ResumeMixin
from .reward_scoring import RewardScoringMixin
from .row_metrics import RowMetricsMixin
from .tokenization import prepare_rewarded_dataset


__all__ = ["PRECOMPUTE_FILE", "STREAM_SAMPLE_ROWS", "OfflineRLTrainer"]


class OfflineRLTrainer(
    ModelSetupMixin, RewardScoringMixin, ReferencePassesMixin, ResumeMixin, RowMetricsMixin, BaseTrainer
):
    """Base of the trainers that learn from `(prompt, completion, reward)` rows; see the module docstring.

    Subclasses set `_config_class`, `_name` and `_tag_names` and implement `compute_loss`; before training they run
    the frozen reference over a dataset with `reference_model`, `reference_forward`, `map_rows` and `cached_columns`
    ([`ReferencePassesMixin`]), and say what a resume reuses with `precompute_state` ([`ResumeMixin`]).
    """

    loss_is_scaled_for_ga = False
    _config_class: type[TrainingArguments]

    def __init__(
        self,
        model,
        ref_model=None,
        args: TrainingArguments | None = None,
        data_collator=None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        reward_funcs=None,
        reward_processing_classes=None,
        compute_metrics: Callable | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
    ):
        args = self._as_config(model, args)
        if train_dataset is None:
            raise ValueError(f"{type(self).__name__} needs a `train_dataset`.")
        for name, dataset in {"train": train_dataset, **self._named(eval_dataset)}.items():
            self._check_dataset_type(dataset, name, args, reward_funcs)
        self._check_liger_kernel(args)
        set_seed(args.seed)  # PEFT initialises adapters randomly
        model = self._load_model(model, args, quantization_config)
        quantized = is_quantized(model)
        if quantized:
            keep_4bit_layers_differentiable(model)
        if ref_model is not None and ref_model is model:
            raise ValueError("`model` and `ref_model` cannot be the same object; omit `ref_model` to use the model.")
        processing_class = self._load_tokenizer(processing_class, model, args)
        model = self._maybe_wrap_peft(model, peft_config, args)
        self._prepare_peft_training(model, args, quantized)
        # Without a separate reference, the model at this point is the reference (reference passes run before any
        # training step); a LoRA adapter the trainer just created starts at zero, so disabling it is the same model
        self._reference_disables_adapters = peft_config is not None and ref_model is None

        self._set_reward_funcs(reward_funcs, reward_processing_classes, args)
        self._tokenizer = processing_class
        # As TRL's trainers do: the main process prepares first, the others then load its cache files
        with args.main_process_first(desc="dataset preparation"):
            train_dataset = self._prepare_dataset(train_dataset, args, "train")
            eval_dataset = self._map_named(eval_dataset, lambda d, n: self._prepare_dataset(d, args, n))
        if data_collator is None:
            data_collator = DataCollatorForRewardedCompletions(
                processing_class.pad_token_id, pad_to_multiple_of=args.pad_to_multiple_of
            )
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        if self.is_fsdp_enabled and self.accelerator.state.fsdp_plugin.cpu_ram_efficient_loading:
            raise ValueError(
                f"{type(self).__name__} runs its reference passes before FSDP shards the model, so every process "
                "needs the full weights then: turn off `cpu_ram_efficient_loading` in the FSDP config."
            )
        # MoE load-balancing loss, as `KTOTrainer` adds it: the architecture's own coefficient unless one is given
        text_config = self.accelerator.unwrap_model(self.model).config.get_text_config()
        coef = args.router_aux_loss_coef
        if coef and not hasattr(text_config, "output_router_logits"):
            raise ValueError(
                f"`router_aux_loss_coef` is {coef}, but the model is not a Mixture-of-Experts model that returns its "
                "router logits: there is no auxiliary loss to weight."
            )
        self.router_aux_loss_coef = getattr(text_config, "router_aux_loss_coef", 0.0) if coef is None else coef
        self.aux_loss_enabled = hasattr(text_config, "output_router_logits") and self.router_aux_loss_coef != 0.0
        if args.n_gpu > 1:
            raise ValueError(
                f"{type(self).__name__} does not support `nn.DataParallel`: launch with `accelerate launch` or make "
                "one GPU visible with `CUDA_VISIBLE_DEVICES`."
            )
        if args.disable_dropout:
            disable_dropout_in_model(self.model)
        # Per-token log-probabilities without the (B, T, V) logits
        add_fused_lm_head(self.model.get_base_model() if is_peft_model(self.model) else self.model)
        self._prepare_reference(ref_model, args)
        self._init_row_metrics()
        self.model.add_model_tags(self._tag_names)
        if self.reward_funcs is not None:  # scored once, each process taking its share of the rows
            self._prepare_reward_models()
            self.train_dataset = self.with_rewards(self.train_dataset, "train")
            self.eval_dataset = self._map_named(self.eval_dataset, self.with_rewards)

    def streaming_refusal(self, args) -> str | None:
        """Why this trainer cannot train on a streamed `IterableDataset` with `args`, or `None` if it can."""
        return None

    def _check_dataset_type(self, dataset, name: str, args, reward_funcs) -> None:
        if isinstance(dataset, IterableDataset):
            reason = self.streaming_refusal(args)
            if reason is None and reward_funcs is not None:
                reason = "`reward_funcs` score every row once before training"
            if reason is not None:
                raise TypeError(
                    f"The {name} dataset is an IterableDataset (streaming), which {self._name} cannot take here: "
                    f"{reason}. Pass a map-style `datasets.Dataset`."
                )
            # As `KTOTrainer`: accelerate's dispatching would concatenate batches that processes read apart
            args.accelerator_config.dispatch_batches = False
        elif not isinstance(dataset, Dataset):
            raise TypeError(
                f"The {name} dataset must be a `datasets.Dataset` or `IterableDataset`, got {type(dataset).__name__}."
            )
        elif len(dataset) == 0:
            raise ValueError(f"The {name} dataset is empty: there is nothing to train or evaluate on.")

    @staticmethod
    def _named(datasets) -> dict:
        return {} if datasets is None else datasets if isinstance(datasets, dict) else {"eval": datasets}

    @staticmethod
    def _map_named(datasets, fn):
        if datasets is None:
            return None
        if isinstance(datasets, dict):
            return {name: fn(dataset, name) for name, dataset in datasets.items()}
        return fn(datasets, "eval")

    # -- data --------------------------------------------------------------------------------------------------------

    def _prepare_dataset(self, dataset: Dataset | IterableDataset, args, name: str) -> Dataset | IterableDataset:
        """`dataset` normalised to rewarded rows and tokenized (see [`prepare_rewarded_dataset`])."""
        scored = self.reward_funcs is not None
        return prepare_rewarded_dataset(dataset, self._tokenizer, args, name, scored_by_reward_funcs=scored)

    def prepare_eval_dataset(self, dataset: Dataset) -> Dataset:
        """A dataset passed to `evaluate`, prepared like the ones given at construction."""
        dataset = self._prepare_dataset(dataset, self.args, "eval")
        return self.with_rewards(dataset, "eval") if self.reward_funcs is not None else dataset

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = [
                "prompt_ids", "completion_ids", "reward", "ref_logps", "ref_logp", "value", "advantage"
            ]  # fmt: skip

    # -- training ----------------------------------------------------------------------------------------------------

    def policy_forward_kwargs(self) -> dict:
        """Keyword arguments of the policy's training forward beyond the batch: MoE models return their router
        logits, from which TRL's fused head computes the load-balancing loss (`outputs.aux_loss`)."""
        return {"output_router_logits": True} if self.aux_loss_enabled else {}

    def add_aux_loss(self, loss: torch.Tensor, outputs, mode: str, num_rows: int) -> torch.Tensor:
        """`loss + router_aux_loss_coef * aux_loss` for MoE models (`aux_loss` logged, weighed by the batch's
        `num_rows`), `loss` otherwise."""
        if not self.aux_loss_enabled:
            return loss
        aux_loss = outputs.aux_loss
        self.log_row_metrics(mode, {"aux_loss": aux_loss.detach().float().expand(num_rows)}, {"aux_loss": "rows"})
        return loss + self.router_aux_loss_coef * aux_loss

    @functools.cached_property
    def _activation_offload_context(self):
        if not self.args.activation_offloading:
            return contextlib.nullcontext()
        return get_act_offloading_ctx_manager(model=self.model)

    def training_step(self, *args, **kwargs):
        # As `KTOTrainer`: the step's activations go to the CPU when `activation_offloading` asks for it
        with self._activation_offload_context:
            return super().training_step(*args, **kwargs)

    def _save_checkpoint(self, model, trial):
        self.create_model_card(model_name=model_card_name(self.args))
        super()._save_checkpoint(model, trial)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        if not _internal_call and self.is_world_process_zero():
            write_model_card(self, output_dir)
