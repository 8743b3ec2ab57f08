from dataclasses import dataclass, field
from typing import Any

from ._trl_compat import BaseConfig


@dataclass
class OfflineRLConfig(BaseConfig):
    r"""
    The fields shared by the configurations of the trainers that learn from scored responses ([`ALoLConfig`],
    [`DROConfig`]): those of [`~trl.KTOConfig`] that control the model and the data, with the same names and defaults,
    and the weights of `reward_funcs` as in [`~trl.GRPOConfig`].

    Parameters:
        > Parameters that control the model

        model_init_kwargs (`dict[str, Any]`, *optional*):
            Keyword arguments for `from_pretrained` when `model` (or a reward model) is a string.
        trust_remote_code (`bool`, *optional*, defaults to `False`):
            Whether to allow models and tokenizers that ship custom code.
        disable_dropout (`bool`, *optional*, defaults to `True`):
            Whether to disable dropout in the model, so that the policy and the reference score a response alike.
        activation_offloading (`bool`, *optional*, defaults to `False`):
            Whether to offload the activations to the CPU during the training step, with TRL's context manager, as
            [`~trl.KTOConfig`] does. It needs an accelerator (e.g. a GPU): an error when training runs on the CPU.
        router_aux_loss_coef (`float`, *optional*):
            Coefficient of the load-balancing auxiliary loss of Mixture-of-Experts models, added to the training loss
            as [`~trl.KTOConfig`] adds it. When not set, the value the model's config declares is used; `0.0`
            disables it. An error with a model that is not a Mixture-of-Experts.

        > Parameters that control the data

        dataset_num_proc (`int`, *optional*):
            Number of processes to use for processing the dataset.
        max_length (`int` or `None`, *optional*, defaults to `1024`):
            Maximum length of prompt + completion in tokens. Completions are truncated from the right to fit; rows
            whose prompt alone leaves no room for a completion token are dropped, as [`~trl.KTOTrainer`] drops them,
            with a warning that counts them (an error if no row is left).
        pad_to_multiple_of (`int` or `str`, *optional*, defaults to `"auto"`):
            If set, the sequences of a batch are padded to a multiple of this value. `"auto"`, as in
            [`~trl.KTOConfig`], pads to a multiple of 128 on Neuron (AWS Trainium), which compiles once per input shape,
            and does not pad elsewhere.
        reward_weights (`list[float]`, *optional*):
            Weights of the `reward_funcs` passed to the trainer, all 1.0 by default.
        precompute_ref_batch_size (`int`, *optional*):
            Batch size of the reference passes before training. Defaults to `per_device_train_batch_size` for
            training data and `per_device_eval_batch_size` for evaluation data.
    """

    _VALID_DICT_FIELDS = BaseConfig._VALID_DICT_FIELDS + ["model_init_kwargs"]

    # Parameters that control the model
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments for `from_pretrained` when `model` (or a reward model) is a string."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Whether to allow models and tokenizers that ship custom code."},
    )
    disable_dropout: bool = field(
        default=True,
        metadata={"help": "Whether to disable dropout in the model."},
    )

    activation_offloading: bool = field(
        default=False,
        metadata={"help": "Whether to offload the activations to the CPU during the training step (needs a GPU)."},
    )
    router_aux_loss_coef: float | None = field(
        default=None,
        metadata={
            "help": "Coefficient of the Mixture-of-Experts load-balancing loss added to the training loss; the model "
            "config's value when not set, 0.0 to disable. Fails with a non-MoE model."
        },
    )

    # Parameters that control the data
    dataset_num_proc: int | None = field(
        default=None,
        metadata={"help": "Number of processes to use for processing the dataset."},
    )
    max_length: int | None = field(
        default=1024,
        metadata={
            "help": "Maximum length of prompt + completion in tokens. Completions are truncated from the right; rows "
            "whose prompt leaves no room for a completion token are dropped with a warning."
        },
    )
    pad_to_multiple_of: int | str | None = field(
        default="auto",
        metadata={
            "help": "If set, the sequences of a batch are padded to a multiple of this value; 'auto' pads to a "
            "multiple of 128 on Neuron and does not pad elsewhere."
        },
    )
    reward_weights: list[float] | None = field(
        default=None,
        metadata={"help": "Weights of the reward functions, all 1.0 by default."},
    )
    precompute_ref_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Batch size of the reference passes before training; defaults to the per-device train (or eval) "
            "batch size."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.pad_to_multiple_of, str):  # "auto", or a number or "none" from the command line
            if self.pad_to_multiple_of == "auto":
                # Neuron compiles once per input shape, so padding bounds the number of compilations
                self.pad_to_multiple_of = 128 if self.device.type == "neuron" else None
            elif self.pad_to_multiple_of.lower() in ("none", "null"):
                self.pad_to_multiple_of = None
            else:
                self.pad_to_multiple_of = int(self.pad_to_multiple_of)
        check_activation_offloading(self)
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(
                f"`max_length` must be at least 2 (a prompt and a completion token), got {self.max_length}."
            )
        if self.reward_weights is not None and not all(isinstance(w, int | float) for w in self.reward_weights):
            raise TypeError(f"`reward_weights` must be a list of numbers, got {self.reward_weights!r}.")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"`pad_to_multiple_of` must be >= 1, got {self.pad_to_multiple_of}.")
        if self.precompute_ref_batch_size is not None and self.precompute_ref_batch_size < 1:
            raise ValueError(f"`precompute_ref_batch_size` must be >= 1, got {self.precompute_ref_batch_size}.")


def check_activation_offloading(args) -> None:
    """TRL's activation offloading moves activations from the accelerator to the CPU; on a CPU-only run it fails deep
    inside the first step, so it is refused up front."""
    if args.activation_offloading and args.device.type == "cpu":
        raise ValueError(
            "`activation_offloading=True` offloads activations from an accelerator (e.g. a GPU) to the CPU, but this "
            "run trains on the CPU: set `activation_offloading=False`."
        )
