"""The set-up [`OfflineRLTrainer`] shares with TRL's `KTOTrainer`, in the order its constructor runs it: the config (a
`KTOConfig` is taken as far as its fields mean the same here), Liger's kernels, the model from a path or an object, the
tokenizer, and a PEFT adapter ready to train (QLoRA included)."""

import dataclasses
import os
import warnings

from accelerate.utils import is_peft_model
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging

from ._trl_compat import create_model_from_path, get_config_model_id
from .offline_config import OfflineRLConfig
from .quantization import cast_adapters_to_bf16, peft_model_kwargs


logger = logging.get_logger(__name__)


def _field_defaults(config_class) -> dict:
    defaults = {}
    for f in dataclasses.fields(config_class):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    return defaults


class ModelSetupMixin:
    """Config, model, tokenizer and PEFT set-up of [`OfflineRLTrainer`], as `KTOTrainer` does it.

    The trainer class sets `_config_class` and `_name`.
    """

    # Fields of `_config_class` that `KTOConfig` also has with another meaning: never carried over from one
    _fields_meaning_otherwise: tuple[str, ...] = ("beta", "loss_type")

    def _as_config(self, model, args):
        if args is None:
            name = model if isinstance(model, str) else get_config_model_id(model.config)
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

    @staticmethod
    def _load_tokenizer(processing_class, model, args) -> PreTrainedTokenizerBase:
        """The tokenizer (the model's own unless one is given), with a pad token the model's config agrees on."""
        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(
                get_config_model_id(model.config), trust_remote_code=args.trust_remote_code
            )
        if not isinstance(processing_class, PreTrainedTokenizerBase):
            raise TypeError(
                f"`processing_class` must be a tokenizer (text-only models), got {type(processing_class).__name__}."
            )
        if processing_class.pad_token is None:
            processing_class.pad_token = processing_class.eos_token
        model.config.get_text_config().pad_token_id = processing_class.pad_token_id
        return processing_class

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
