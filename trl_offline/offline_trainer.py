"""What the trainers that learn from scored responses (A-LoL, DRO) share: TRL's `KTOTrainer` set-up (model as a path
or an object, tokenizer, PEFT, a frozen reference, the fused LM head), rows normalised to prompt + completion + reward,
their tokenization and collation, and reference passes over a whole dataset before training that work under DDP and
DeepSpeed ZeRO-3."""

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import warnings
from collections import defaultdict
from collections.abc import Callable

import torch
from accelerate.utils import broadcast_object_list, is_peft_model
from datasets import Dataset, IterableDataset, concatenate_datasets
from datasets.fingerprint import Hasher
from transformers import AutoTokenizer, PreTrainedTokenizerBase, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging
from trl import is_conversational
from trl.data_utils import common_prefix_length
from trl.models import get_act_offloading_ctx_manager, prepare_deepspeed

from ._trl_compat import (
    BaseTrainer,
    add_fused_lm_head,
    create_model_from_path,
    disable_dropout_in_model,
    disable_gradient_checkpointing,
    hash_module,
    tokenize,
    use_adapter,
)
from .collator import DataCollatorForRewardedCompletions
from .data import chat_template_kwargs, column_names, drop_long_prompts, map_kwargs, to_rewarded_dataset
from .model_card import model_card_name, write_model_card
from .offline_config import OfflineRLConfig
from .precompute import map_rows
from .quantization import cast_adapters_to_bf16, is_quantized, keep_4bit_layers_differentiable, peft_model_kwargs
from .rewards import load_reward_funcs, prepare_reward_funcs, rewards_fingerprint, score_batch


logger = logging.get_logger(__name__)

PRECOMPUTE_FILE = "precompute_state.pt"  # in `output_dir` and every checkpoint: what a resume reuses
# What stands for a streamed dataset where its rows must be summed up before training (statistics, a fingerprint)
STREAM_SAMPLE_ROWS = 1000


def _field_defaults(config_class) -> dict:
    defaults = {}
    for f in dataclasses.fields(config_class):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    return defaults


class _LogAtTrainBegin(TrainerCallback):
    """Logs what was measured before training (the value head's fit, the positive fraction) as step 0."""

    def __init__(self, trainer: "OfflineRLTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer.precompute_metrics:
            self.trainer.log(dict(self.trainer.precompute_metrics))


class OfflineRLTrainer(BaseTrainer):
    """Base of the trainers that learn from `(prompt, completion, reward)` rows; see the module docstring.

    Subclasses set `_config_class` and implement `compute_loss`; they call `reference_pass` to run the frozen
    reference over a dataset before training.
    """

    loss_is_scaled_for_ga = False
    _config_class: type[TrainingArguments]
    # Fields of `_config_class` that `KTOConfig` also has with another meaning: never carried over from one
    _fields_meaning_otherwise: tuple[str, ...] = ("beta", "loss_type")

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
        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(
                model.config._name_or_path, trust_remote_code=args.trust_remote_code
            )
        if not isinstance(processing_class, PreTrainedTokenizerBase):
            raise TypeError(
                f"`processing_class` must be a tokenizer (text-only models), got {type(processing_class).__name__}."
            )
        if processing_class.pad_token is None:
            processing_class.pad_token = processing_class.eos_token
        model.config.get_text_config().pad_token_id = processing_class.pad_token_id
        model = self._maybe_wrap_peft(model, peft_config, args)
        self._prepare_peft_training(model, args, quantized)
        # Without a separate reference, the model at this point is the reference (reference passes run before any
        # training step); a LoRA adapter the trainer just created starts at zero, so disabling it is the same model
        self._reference_disables_adapters = peft_config is not None and ref_model is None

        self.reward_funcs, self.reward_processing_classes, self.reward_weights = None, None, None
        if reward_funcs is not None:
            self.reward_funcs, self.reward_processing_classes, self.reward_weights = prepare_reward_funcs(
                *load_reward_funcs(reward_funcs, reward_processing_classes, args.model_init_kwargs),
                args.reward_weights,
                args.device,
            )
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
        self.ref_model = ref_model
        if ref_model is not None:
            add_fused_lm_head(ref_model)
            if args.disable_dropout:
                disable_dropout_in_model(ref_model)
            if self.is_deepspeed_enabled:
                self.ref_model = prepare_deepspeed(ref_model, self.accelerator)
            else:
                self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)
        self._reference_engine = None
        self._metric_totals = {"train": defaultdict(float), "eval": defaultdict(float)}
        self._metric_denominators: dict[str, str] = {}
        self.precompute_metrics: dict[str, float] = {}
        self.add_callback(_LogAtTrainBegin(self))
        self.model.add_model_tags(self._tag_names)
        if self.reward_funcs is not None:  # scored once, each process taking its share of the rows
            self._prepare_reward_models()
            self.train_dataset = self.with_rewards(self.train_dataset, "train")
            self.eval_dataset = self._map_named(self.eval_dataset, self.with_rewards)

    # -- set-up ------------------------------------------------------------------------------------------------------

    def _as_config(self, model, args):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            return self._config_class(f"{os.path.basename(name.rstrip('/')) or 'model'}-{self._name}")
        if isinstance(args, self._config_class):
            return args
        dict_args = args.to_dict()
        dict_args["hub_token"] = args.hub_token  # to_dict hides it
        # Another trainer's config (e.g. a `KTOConfig`): its training fields carry over. Its method's fields carry
        # over only where the name means the same here and the user set it; a field with no meaning here (or another
        # one, as KTO's `beta` is not DRO's) is an error if set away from its default, and dropped otherwise
        shared = {f.name for f in dataclasses.fields(OfflineRLConfig) if f.init}
        ours = {f.name for f in dataclasses.fields(self._config_class) if f.init} - set(self._fields_meaning_otherwise)
        source_defaults = _field_defaults(type(args))
        changed = {k for k in dict_args if k in source_defaults and getattr(args, k) != source_defaults[k]}
        not_ours = sorted(k for k in changed if k not in shared and k not in ours)
        if not_ours:
            raise ValueError(
                f"`args` is a {type(args).__name__} that sets {not_ours}, which {self._name} does not have or reads "
                f"differently: pass a {self._config_class.__name__} (see docs/parity.md for what each field does)."
            )
        kept = {k: v for k, v in dict_args.items() if k in shared or (k in ours and k in changed)}
        return self._config_class(**kept)

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

    @staticmethod
    def _check_liger_kernel(args) -> None:
        """Liger's kernels as `KTOTrainer` takes them: its fused linear cross-entropy would replace the forward that
        TRL's fused LM head patches, so only the layer kernels are applied (`Trainer.train` applies them)."""
        if not args.use_liger_kernel:
            return
        warnings.warn(
            "`use_liger_kernel=True` is deprecated and will be removed in TRL v2.0.0; load the Hub kernels with "
            '`model_init_kwargs={"use_kernels": True}` instead.',
            FutureWarning,
            stacklevel=3,
        )
        liger_kernel_config = args.liger_kernel_config or {}
        if liger_kernel_config.get("fused_linear_cross_entropy"):
            raise ValueError(
                '`liger_kernel_config={"fused_linear_cross_entropy": True}` is not supported: that kernel replaces '
                "the model's forward, which the trainer patches to compute log-probabilities with a fused LM head. "
                "Leave it unset (it is turned off) to use the other Liger kernels."
            )
        args.liger_kernel_config = {**liger_kernel_config, "fused_linear_cross_entropy": False}

    def _load_model(self, model, args, quantization_config=None):
        if not isinstance(model, str):
            if args.model_init_kwargs is not None:
                logger.warning("`model_init_kwargs` are ignored: the model is already instantiated.")
            if quantization_config is not None:
                raise ValueError(
                    "`quantization_config` applies when the trainer loads the model from a path or hub id, but the "
                    "model is already instantiated: pass its path, or load it quantized yourself and omit "
                    "`quantization_config`."
                )
            return model
        return create_model_from_path(model, **self.model_init_kwargs(args, quantization_config))

    @staticmethod
    def model_init_kwargs(args, quantization_config=None) -> dict:
        """`from_pretrained` keyword arguments of the models the trainer loads from a path, with the trainer's
        `quantization_config` among them."""
        model_init_kwargs = dict(args.model_init_kwargs or {})
        if quantization_config is not None:
            if "quantization_config" in model_init_kwargs:
                raise ValueError(
                    "`quantization_config` is given both to the trainer and in `args.model_init_kwargs`: give it in "
                    "one place (the trainer argument, as TRL's scripts do)."
                )
            model_init_kwargs["quantization_config"] = quantization_config
        if args.distributed_state.distributed_type in ["MULTI_GPU", "DEEPSPEED"]:
            model_init_kwargs["device_map"] = None  # "auto" fails under distributed training
        model_init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
        return model_init_kwargs

    def _maybe_wrap_peft(self, model, peft_config, args):
        if peft_config is None:
            return model
        from peft import PeftConfig, get_peft_model
        from peft.tuners.tuners_utils import BaseTunerLayer

        if not isinstance(peft_config, PeftConfig):
            raise TypeError(
                f"`peft_config` must be a `peft.PeftConfig` (e.g. `peft.LoraConfig`), got {type(peft_config).__name__}."
            )
        if is_peft_model(model):
            raise ValueError("You passed a PEFT model and a `peft_config`; merge the adapter first or pass one.")
        model = get_peft_model(model, peft_config, **peft_model_kwargs(model, args))
        if isinstance(model.get_output_embeddings(), BaseTunerLayer):
            raise ValueError(
                "A PEFT adapter on `lm_head` is not supported: log-probabilities are computed from `lm_head.weight` "
                "directly, so the adapter would never be trained. Remove 'lm_head' from `target_modules`."
            )
        return model

    @staticmethod
    def _prepare_peft_training(model, args, quantized: bool) -> None:
        """What a PEFT model needs to train as `KTOTrainer` trains it: reentrant checkpointing under ZeRO-3, inputs that
        carry gradients through checkpointed layers, and QLoRA adapters in bf16."""
        if not is_peft_model(model):
            return
        if args.gradient_checkpointing:
            if args.deepspeed_plugin is not None and args.deepspeed_plugin.zero_stage == 3:
                # ZeRO-3 fetches a PEFT model's parameters wrongly in a non-reentrant recomputation (TRL issue 2514)
                kwargs = dict(args.gradient_checkpointing_kwargs or {})
                if kwargs.get("use_reentrant") is False:
                    logger.warning(
                        "PEFT with DeepSpeed ZeRO-3 and gradient checkpointing needs `use_reentrant=True`: the "
                        "`use_reentrant=False` of `gradient_checkpointing_kwargs` is overridden. Unset it or set it to "
                        "True to silence this warning."
                    )
                args.gradient_checkpointing_kwargs = {**kwargs, "use_reentrant": True}
            # Frozen embeddings would give a checkpointed layer no input that requires grad (transformers issue 42489)
            model.enable_input_require_grads()
        if quantized:
            cast_adapters_to_bf16(model)

    # -- data --------------------------------------------------------------------------------------------------------

    def _prepare_dataset(self, dataset: Dataset | IterableDataset, args, name: str) -> Dataset | IterableDataset:
        """Rows with a float `reward` (from the data or `reward_funcs`), `prompt_ids` and `completion_ids` that fit
        in `max_length`, tokenized as `KTOTrainer` tokenizes them; rows whose prompt alone fills `max_length` are
        dropped (with a warning), as `KTOTrainer` drops them. Every check names the column and the row. A streamed
        dataset is prepared lazily, as it streams."""
        if "prompt_ids" in column_names(dataset):  # already prepared, e.g. by a previous call
            return dataset
        num_proc = args.dataset_num_proc
        if self.reward_funcs is not None:
            if "reward" in column_names(dataset):
                raise ValueError(
                    f"The {name} dataset has a 'reward' column and `reward_funcs` were given: pass one source of "
                    "rewards (drop the column or the functions)."
                )
            # A `label` column stays as it is: the reward functions decide the rewards (`with_rewards`)
            dataset = to_rewarded_dataset(dataset, requires_reward=False, name=name, num_proc=num_proc)
        else:
            dataset = to_rewarded_dataset(dataset, name=name, num_proc=num_proc)
        dataset = dataset.map(self._tokenize_row, **map_kwargs(dataset, num_proc, f"Tokenizing {name} dataset"))
        if args.max_length is not None:
            # Before anything counts or scores the rows: `reward_funcs` and the reference passes see the kept ones
            dataset = drop_long_prompts(dataset, args.max_length, name, num_proc)
            room = args.max_length
            dataset = dataset.map(
                lambda row: {"completion_ids": row["completion_ids"][: room - len(row["prompt_ids"])]},
                **map_kwargs(dataset, num_proc, f"Truncating {name} completions to max_length"),
            )
        return dataset

    def prepare_eval_dataset(self, dataset: Dataset) -> Dataset:
        """A dataset passed to `evaluate`, prepared like the ones given at construction."""
        dataset = self._prepare_dataset(dataset, self.args, "eval")
        return self.with_rewards(dataset, "eval") if self.reward_funcs is not None else dataset

    def _tokenize_row(self, row: dict) -> dict[str, list[int]]:
        """Prompt and completion ids as TRL's `KTOTrainer` makes them: conversational rows through the chat template
        with their `tools` and `chat_template_kwargs`, standard ones with an eos after the completion; the completion
        starts where the tokenized prompt and prompt + completion diverge."""
        tokenizer = self._tokenizer
        if is_conversational(row):
            kwargs = chat_template_kwargs(row)
            prompt_ids = tokenize(tokenizer, row["prompt"], add_generation_prompt=True, **kwargs)["input_ids"]
            full_ids = tokenize(tokenizer, row["prompt"] + row["completion"], **kwargs)["input_ids"]
        else:
            completion = row["completion"]
            if tokenizer.eos_token and not completion.endswith(tokenizer.eos_token):
                completion += tokenizer.eos_token
            prompt_ids = tokenize(tokenizer, row["prompt"])["input_ids"]
            full_ids = tokenize(tokenizer, row["prompt"] + completion)["input_ids"]
        prompt_len = common_prefix_length(prompt_ids, full_ids)
        if prompt_len < len(prompt_ids):
            # A template that renders the prompt alone differently, or tokens merging across the boundary
            logger.warning_once(
                "A tokenized prompt is not a prefix of its tokenized prompt + completion (the chat template renders "
                "the prompt alone differently, or tokens merge across the boundary). As in TRL's KTOTrainer, the "
                "completion starts where the two diverge and the rest of the prompt, "
                f"{tokenizer.decode(prompt_ids[prompt_len:])!r}, is not part of the training sequence, so the "
                "model learns from a context slightly unlike the one it is prompted with. End prompts on a token "
                "boundary, or use a template that renders the prompt alike in both cases. Shown once; it likely "
                "applies to many rows."
            )
        return {"prompt_ids": prompt_ids[:prompt_len], "completion_ids": full_ids[prompt_len:]}

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = [
                "prompt_ids", "completion_ids", "reward", "ref_logps", "ref_logp", "value", "advantage"
            ]  # fmt: skip

    # -- reference passes before training ----------------------------------------------------------------------------

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

    def with_rewards(self, dataset: Dataset, name: str) -> Dataset:
        """`dataset` with a `reward` column from `reward_funcs`, each process scoring its share of the rows (cached
        beside a file-backed dataset)."""
        if "reward" in dataset.column_names:  # already scored, e.g. passed back to `evaluate`
            return dataset
        unwrapped = [
            self.accelerator.unwrap_model(f) if isinstance(f, torch.nn.Module) else f for f in self.reward_funcs
        ]
        fingerprint = rewards_fingerprint(
            dataset, unwrapped, self.reward_processing_classes, self.reward_weights, "reward"
        )
        return self.cached_columns(dataset, fingerprint, lambda: {"reward": self.reward_funcs_scores(dataset, name)})

    def _prepare_reward_models(self) -> None:
        """Reward models ready for the distributed passes, as TRL's GRPO prepares them: under ZeRO-3 they were loaded
        sharded, so each runs in an inference engine (every process takes part in every forward: the passes give
        them the same number of batches)."""
        for i, reward_func in enumerate(self.reward_funcs):
            if isinstance(reward_func, torch.nn.Module):
                if self.is_deepspeed_enabled:
                    self.reward_funcs[i] = prepare_deepspeed(reward_func, self.accelerator)
                else:
                    self.reward_funcs[i] = self.accelerator.prepare_model(
                        reward_func, evaluation_mode=True, device_placement=True
                    )

    def reward_funcs_scores(self, dataset: Dataset, name: str) -> list[float]:
        """The `reward_funcs` score of every row of `dataset` (`prompt`, `completion` and the other columns)."""
        text_columns = [c for c in dataset.column_names if c not in ("prompt_ids", "completion_ids")]
        rows = dataset.select_columns(text_columns)

        def score(indices: list[int]) -> dict[str, torch.Tensor]:
            rewards = score_batch(
                rows[indices],
                indices[0],
                self.reward_funcs,
                self.reward_processing_classes,
                self.reward_weights,
                self.args.device,
            )
            return {"reward": torch.tensor(rewards, dtype=torch.float64)}

        return self.map_rows(len(rows), score, self._reward_batch_size(), f"Scoring the {name} rows")["reward"]

    def _reward_batch_size(self) -> int:
        return self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size

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

    # -- what a resume reuses ----------------------------------------------------------------------------------------

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

    # -- logging and saving ------------------------------------------------------------------------------------------

    def log_row_metrics(self, mode: str, rows: dict[str, torch.Tensor], denominators: dict[str, str]) -> None:
        """Adds per-row metrics to the totals of the next log, over every process, with one gather.

        `rows` maps names to `(B,)` tensors, one value per row, that are summed; `denominators` maps each reported
        metric to the name whose total divides it (e.g. `"reward/mean": "rows"`). Totals run over every batch since
        the last log, so a short batch weighs as many rows as it has.
        """
        keys = list(rows)
        per_row = torch.stack([rows[key].float() for key in keys], dim=1)  # (B, K)
        # One entry per sample, so that `gather_for_metrics` drops the samples repeated to even out the last batch
        totals = self.accelerator.gather_for_metrics(per_row).sum(0).tolist()  # (K,)
        for key, total in zip(keys, totals):
            self._metric_totals[mode][key] += total
        self._metric_denominators.update(denominators)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        totals = self._metric_totals[mode]
        metrics = {
            key: totals[key] / totals[denominator]
            for key, denominator in self._metric_denominators.items()
            if totals.get(denominator)
        }
        if mode == "eval":
            metrics = {f"eval_{key}": value for key, value in metrics.items()}
        logs.update(metrics)  # in place: `evaluate` returns the dict it logged
        super().log(logs, start_time)
        totals.clear()

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

    # What `compute_metrics` receives per evaluation row, in this order, with the row's reward as `label_ids`
    PREDICTION_COLUMNS = ("logp", "ref_logp", "value")

    @staticmethod
    def row_predictions(logps: torch.Tensor, ref_logps: torch.Tensor, values: torch.Tensor) -> dict:
        """`compute_loss`'s outputs for evaluation: `(B, 3)` per row, the columns of `PREDICTION_COLUMNS`:
        `log pi(y|x)`, `log pi_ref(y|x)` (sums over the completion) and `V(x)`."""
        return {"row_predictions": torch.stack([logps.float(), ref_logps.float(), values.float()], dim=1)}

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The loss, and unless only the loss is asked for (no `compute_metrics`), each row's `PREDICTION_COLUMNS`
        `(B, 3)` as predictions and its reward `(B,)` as labels, gathered over processes by the evaluation loop."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        return loss.detach(), outputs["row_predictions"], inputs["reward"].float()

    def _save_checkpoint(self, model, trial):
        self.create_model_card(model_name=model_card_name(self.args))
        super()._save_checkpoint(model, trial)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        if not _internal_call and self.is_world_process_zero():
            write_model_card(self, output_dir)
