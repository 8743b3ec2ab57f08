from dataclasses import dataclass, field

from ..losses.alol import VARIANTS
from ..offline_config import OfflineRLConfig


@dataclass
class ALoLConfig(OfflineRLConfig):
    r"""
    Configuration class for the [`ALoLTrainer`].

    A-LoL (Baheti et al. 2024, arXiv 2305.14718) is offline policy gradient with the whole response as one action: it
    trains only on rows whose reward beats the reference policy's value, `A = R(x, y) - V_ref(x) > 0`. The data and
    model fields are those of [`~trl.KTOConfig`]; the reference log-probabilities and the advantages are always
    precomputed, since offline data never changes.

    Parameters:
        > Parameters shared with the other trainers that learn from scored responses

        `model_init_kwargs`, `trust_remote_code`, `disable_dropout`, `dataset_num_proc`, `max_length`,
        `reward_weights` and `precompute_ref_batch_size`: see [`OfflineRLConfig`].

        > Parameters whose defaults differ from [`~transformers.TrainingArguments`]

        learning_rate (`float`, *optional*, defaults to `2e-5`):
            AdamW learning rate, for full fine-tuning; the paper's QLoRA runs use 2e-4.

        > Parameters that control the A-LoL objective

        loss_type (`str`, *optional*, defaults to `"alol"`):
            One of `"alol"` (sequence importance weight, the paper's main method), `"alol_seq"` (per-token importance
            weights), `"alol_ref_free"` (no importance weight) and `"alol_kl"` (no weight, a KL penalty towards the
            reference instead).
        clip_epsilon (`float`, *optional*, defaults to `0.9`):
            Importance weights are clamped to `[1 - clip_epsilon, 1 + clip_epsilon]` (the paper's HH runs use 0.9).
        kl_coef (`float`, *optional*, defaults to `0.1`):
            Weight of the penalty `log pi(y|x) - log pi_ref(y|x)` of `"alol_kl"`; unused by the other variants.
        precompute_ref_log_probs (`bool`, *optional*, defaults to `True`):
            Always `True`, as [`~trl.KTOConfig`]'s field of that name set: the advantages need the reference over every
            training row before training. `False` is an error.
        priority_sampling (`bool`, *optional*, defaults to `True`):
            Draw training rows with probability proportional to their positive advantage (with replacement), as the
            paper does. An epoch is as many draws as there are positive rows. When `False`, every positive row is
            seen once per epoch, shuffled.

        > Parameters that control the reference value head

        value_num_prompts (`int`, *optional*, defaults to `1024`):
            Number of training prompts (a seeded random subset) the value head is fit on. With `reward_funcs`, the
            targets are the rewards of the reference model's greedy generations for these prompts (the paper's
            recipe); without them, the dataset rewards of these rows.
        max_completion_length (`int`, *optional*, defaults to `256`):
            Maximum number of new tokens of the reference's greedy generations for the value targets.
        value_num_heads (`int`, *optional*, defaults to `8`):
            Attention-pooling heads of the value head (the official code uses 8).
        value_num_epochs (`int`, *optional*, defaults to `10`):
            Epochs of MSE fitting; the epoch with the lowest validation MSE is kept.
        value_learning_rate (`float`, *optional*, defaults to `1e-3`):
            AdamW learning rate of the value head, on standardised targets.
        value_batch_size (`int`, *optional*, defaults to `32`):
            Batch size of the value head's fitting.
        value_validation_fraction (`float`, *optional*, defaults to `0.1`):
            Fraction of the value prompts held out to select the epoch and report the fit.
    """

    # Parameters whose default values are overridden from TrainingArguments
    learning_rate: float = field(
        default=2e-5,
        metadata={"help": "The initial learning rate for AdamW."},
    )

    # Parameters that control the A-LoL objective
    loss_type: str = field(
        default="alol",
        metadata={
            "help": "A-LoL variant: 'alol' (sequence importance weight), 'alol_seq' (per-token weights), "
            "'alol_ref_free' (no weight) or 'alol_kl' (no weight, a KL penalty instead).",
            "choices": list(VARIANTS),
        },
    )
    clip_epsilon: float = field(
        default=0.9,
        metadata={"help": "Importance weights are clamped to [1 - clip_epsilon, 1 + clip_epsilon]."},
    )
    kl_coef: float = field(
        default=0.1,
        metadata={"help": "Weight of the KL penalty of 'alol_kl'; unused by the other variants."},
    )
    precompute_ref_log_probs: bool = field(
        default=True,
        metadata={
            "help": "Always True: the advantages need the reference over every training row before training. Kept "
            "so that a KTO script that sets it runs unchanged; False is an error."
        },
    )
    priority_sampling: bool = field(
        default=True,
        metadata={
            "help": "Draw training rows with probability proportional to their positive advantage; otherwise each "
            "positive row once per epoch."
        },
    )

    # Parameters that control the reference value head
    value_num_prompts: int = field(
        default=1024,
        metadata={"help": "Number of training prompts (a seeded random subset) the value head is fit on."},
    )
    max_completion_length: int = field(
        default=256,
        metadata={"help": "Maximum new tokens of the reference's greedy generations for the value targets."},
    )
    value_num_heads: int = field(
        default=8,
        metadata={"help": "Attention-pooling heads of the value head."},
    )
    value_num_epochs: int = field(
        default=10,
        metadata={"help": "Epochs of the value head's MSE fitting; the best validation epoch is kept."},
    )
    value_learning_rate: float = field(
        default=1e-3,
        metadata={"help": "Learning rate of the value head (on standardised targets)."},
    )
    value_batch_size: int = field(
        default=32,
        metadata={"help": "Batch size of the value head's fitting."},
    )
    value_validation_fraction: float = field(
        default=0.1,
        metadata={"help": "Fraction of the value prompts held out to select the epoch and report the fit."},
    )

    def __post_init__(self):
        super().__post_init__()
        if not self.precompute_ref_log_probs:
            raise ValueError(
                "A-LoL always precomputes the reference log-probabilities: its advantages need the reference's "
                "values over every training row before training. Leave `precompute_ref_log_probs=True`."
            )
        if self.loss_type not in VARIANTS:
            raise ValueError(f"`loss_type` must be one of {VARIANTS}, got {self.loss_type!r}.")
        if not 0 <= self.clip_epsilon < 1:
            raise ValueError(
                f"`clip_epsilon` must be in [0, 1) so that importance weights stay positive, got {self.clip_epsilon}."
            )
        if self.loss_type == "alol_kl" and self.kl_coef <= 0:
            raise ValueError(f"`loss_type='alol_kl'` needs `kl_coef > 0`, got {self.kl_coef}.")
        if self.kl_coef < 0:
            raise ValueError(f"`kl_coef` must be >= 0, got {self.kl_coef}.")
        for name in ("value_num_prompts", "max_completion_length", "value_num_epochs", "value_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}.")
        if self.value_learning_rate <= 0:
            raise ValueError(f"`value_learning_rate` must be > 0, got {self.value_learning_rate}.")
        if not 0 <= self.value_validation_fraction < 1:
            raise ValueError(f"`value_validation_fraction` must be in [0, 1), got {self.value_validation_fraction}.")
