from dataclasses import dataclass, field

from ..offline_config import OfflineRLConfig
from .reward_scaling import DEFAULT_BETA, REWARD_SCALINGS


VALUE_NETWORKS = ("separate", "policy_head", "adapter")


@dataclass
class DROConfig(OfflineRLConfig):
    r"""
    Configuration class for the [`DROTrainer`].

    DRO (Richemond et al. 2024, arXiv 2405.19107) fits the policy and a per-prompt value `V(x)` jointly by least
    squares on `r - V(x) - beta * log(pi(y|x) / pi_ref(y|x))`, from one scored response per row: no pairs. The data
    and model fields are those of [`~trl.KTOConfig`], with the same names and defaults.

    Parameters:
        > Parameters shared with the other trainers that learn from scored responses

        `model_init_kwargs`, `trust_remote_code`, `disable_dropout`, `dataset_num_proc`, `max_length`,
        `reward_weights` and `precompute_ref_batch_size`: see [`OfflineRLConfig`].

        > Parameters whose defaults differ from [`~transformers.TrainingArguments`]

        learning_rate (`float`, *optional*, defaults to `1e-6`):
            Learning rate of the policy, as in [`~trl.KTOConfig`]. The paper trains T5 with Adafactor at 1e-4.

        > Parameters that control the DRO objective

        beta (`float`, *optional*):
            The KL regularisation strength `tau` of the paper, in units of the rewards as `reward_scaling` leaves them:
            the optimum `pi_ref * exp(r / beta)` shifts the log-odds of two answers by their reward difference over
            `beta`, in nats. Higher keeps the policy closer to the reference. Must be > 0. Defaults to `0.1` with
            `reward_scaling="range"` (up to 10 nats between the best and the worst answer) or `"none"`, and to `1.0`,
            the paper's tau, with `"std"`.
        rescale_policy_grad (`bool`, *optional*, defaults to `True`):
            Divide the policy's gradient by `beta`, as the paper does in practice, so that the policy's step size does
            not depend on `beta`. The value's gradient is never rescaled.
        reward_scaling (`str`, *optional*, defaults to `"range"`):
            How the rewards are put on `beta`'s scale, with statistics of the training set (the same shift and scale
            for the evaluation sets): `"range"` centres them and divides by their range, so the best and the worst
            answer differ by 1 whatever the share of thumbs up; `"std"` standardises them to mean 0 and variance 1,
            as the paper does (with `beta=1.0`, the paper's setting); `"none"` keeps them as given. KTO `label`s become
            rewards 1.0 (True) and 0.0 (False) before this.
        precompute_ref_log_probs (`bool`, *optional*, defaults to `True`):
            Compute the reference's log-probabilities once before training (offline data never changes) and cache
            them with the dataset. When `False`, they are computed on each batch, by `ref_model` or, with PEFT, by the
            model with its adapters disabled; without either, a copy of the model is loaded as the reference.

        > Parameters that control the value network

        value_network (`str`, *optional*, defaults to `"separate"`):
            `"separate"`: a network of its own, the model's transformer body plus a linear head on the prompt's last
            token (the paper's choice; one more model's weights, gradients and optimizer state). `"policy_head"`: a
            linear head on the policy's own hidden state at the prompt's last token, detached (no second model).
            `"adapter"`: with PEFT, the value is a second adapter on the same frozen base plus a linear head (no second
            copy of the base weights).
        value_learning_rate (`float`, *optional*):
            Learning rate of the value network, in its own optimizer parameter group (the scheduler and gradient
            clipping apply to it too). Defaults to `learning_rate`, as in the paper.
    """

    # Parameters whose default values are overridden from TrainingArguments
    learning_rate: float = field(
        default=1e-6,
        metadata={"help": "The initial learning rate for AdamW."},
    )

    # Parameters that control the DRO objective
    beta: float | None = field(
        default=None,
        metadata={
            "help": "KL regularisation strength tau (> 0) on the scaled rewards. Defaults to 0.1 with "
            "reward_scaling 'range' or 'none', 1.0 (the paper's) with 'std'."
        },
    )
    rescale_policy_grad: bool = field(
        default=True,
        metadata={"help": "Divide the policy's gradient by beta, as the paper does in practice."},
    )
    reward_scaling: str = field(
        default="range",
        metadata={
            "help": "'range' (centred, divided by their range), 'std' (mean 0, variance 1, the paper's) or 'none'.",
            "choices": list(REWARD_SCALINGS),
        },
    )
    precompute_ref_log_probs: bool = field(
        default=True,
        metadata={"help": "Compute the reference's log-probabilities once before training; otherwise on every batch."},
    )

    # Parameters that control the value network
    value_network: str = field(
        default="separate",
        metadata={
            "help": "'separate' (a value model of its own), 'policy_head' (a head on the policy's detached features) "
            "or 'adapter' (a second PEFT adapter on the same frozen base).",
            "choices": list(VALUE_NETWORKS),
        },
    )
    value_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the value network; defaults to `learning_rate`."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.reward_scaling not in REWARD_SCALINGS:
            raise ValueError(f"`reward_scaling` must be one of {REWARD_SCALINGS}, got {self.reward_scaling!r}.")
        if self.beta is None:
            self.beta = DEFAULT_BETA[self.reward_scaling]
        if self.beta <= 0:
            raise ValueError(f"`beta` must be > 0, got {self.beta}.")
        if self.value_network not in VALUE_NETWORKS:
            raise ValueError(f"`value_network` must be one of {VALUE_NETWORKS}, got {self.value_network!r}.")
        if self.value_learning_rate is not None and self.value_learning_rate <= 0:
            raise ValueError(f"`value_learning_rate` must be > 0, got {self.value_learning_rate}.")
