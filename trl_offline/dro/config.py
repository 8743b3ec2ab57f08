from dataclasses import dataclass, field

from ..offline_config import OfflineRLConfig


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

        beta (`float`, *optional*, defaults to `1.0`):
            The KL regularisation strength `tau` of the paper (which uses 1.0; 0.1 and 5.0 did worse). Higher keeps the
            policy closer to the reference. Must be > 0.
        rescale_policy_grad (`bool`, *optional*, defaults to `True`):
            Divide the policy's gradient by `beta`, as the paper does in practice, so that the policy's step size does
            not depend on `beta`. The value's gradient is never rescaled.
        normalize_rewards (`bool`, *optional*, defaults to `True`):
            Standardise the rewards to mean 0 and variance 1 over the training set (the paper does so), with the same
            shift and scale for the evaluation sets. KTO `label`s become rewards 1.0 (True) and 0.0 (False) before
            this.
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
    beta: float = field(
        default=1.0,
        metadata={"help": "KL regularisation strength tau (> 0); the paper uses 1.0."},
    )
    rescale_policy_grad: bool = field(
        default=True,
        metadata={"help": "Divide the policy's gradient by beta, as the paper does in practice."},
    )
    normalize_rewards: bool = field(
        default=True,
        metadata={"help": "Standardise rewards to mean 0 and variance 1 over the training set."},
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
        if self.beta <= 0:
            raise ValueError(f"`beta` must be > 0, got {self.beta}.")
        if self.value_network not in VALUE_NETWORKS:
            raise ValueError(f"`value_network` must be one of {VALUE_NETWORKS}, got {self.value_network!r}.")
        if self.value_learning_rate is not None and self.value_learning_rate <= 0:
            raise ValueError(f"`value_learning_rate` must be > 0, got {self.value_learning_rate}.")
