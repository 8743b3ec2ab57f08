from dataclasses import dataclass, field

from trl import SFTConfig

from ..offline_config import check_activation_offloading


@dataclass
class IQLearnConfig(SFTConfig):
    r"""
    Configuration class for the [`IQLearnTrainer`].

    IQLearn (Wulfmeier et al. 2024, arXiv 2409.01369) is supervised fine-tuning plus a temporal-difference
    regulariser on the reward the model implies, so this class is [`~trl.SFTConfig`] with two more fields. Every SFT
    field keeps its meaning, except the few that IQLearn cannot honour, which are refused with an error rather than
    run wrong (see below).

    Parameters:
        > Parameters that control the IQLearn objective

        td_coef (`float`, *optional*, defaults to `0.1`):
            Weight `lambda` of the temporal-difference term `(Q(s, a) - gamma * V(s'))^2` added to the per-token
            negative log-likelihood (Eq. 14 of the paper). `0.0` is exactly SFT. Larger values pull the implicit
            per-token reward towards zero, which regularises the logits' scale and, in the paper, keeps generations
            more diverse at equal task performance; the paper sweeps it per task, so treat it as the one knob to tune.
            The default is small enough that the likelihood term dominates.
        gamma (`float`, *optional*, defaults to `1.0`):
            Discount of the next state's value in the implicit reward. Text episodes are short and end at EOS, so
            no discount is needed; with `gamma=1` the implicit rewards of a sequence add up to its soft return.
        logits_chunk_size (`int`, *optional*, defaults to `1024`):
            Number of token positions whose logits are materialised at once when computing `Q(s, a)` and `V(s)`.
            The `(batch, seq_len, vocab)` logits are never built; a smaller chunk lowers peak memory at a small
            speed cost.

        > Parameters from [`~trl.SFTConfig`] that IQLearn refuses

        `packing`, `padding_free`: the TD term bootstraps from the next position of the same sequence, which a
        packed or padding-free row does not delimit. `loss_type` other than `"nll"` and `label_smoothing_factor > 0`:
        IQLearn defines its own loss.
    """

    td_coef: float = field(
        default=0.1,
        metadata={
            "help": "Weight lambda of the temporal-difference term (Q(s, a) - gamma * V(s'))^2 added to the per-token "
            "negative log-likelihood (Eq. 14 of the paper). 0.0 is exactly SFT."
        },
    )
    gamma: float = field(
        default=1.0,
        metadata={"help": "Discount of the next state's value in the implicit reward Q(s, a) - gamma * V(s')."},
    )
    logits_chunk_size: int = field(
        default=1024,
        metadata={
            "help": "Number of token positions whose logits are materialised at once; the full (batch, seq_len, "
            "vocab) logits are never built."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.td_coef < 0:
            raise ValueError(f"`td_coef` must be >= 0 (0 is plain SFT), got {self.td_coef}.")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"`gamma` must be in (0, 1], got {self.gamma}.")
        if self.logits_chunk_size < 1:
            raise ValueError(f"`logits_chunk_size` must be >= 1, got {self.logits_chunk_size}.")
        if self.packing or self.eval_packing:
            raise ValueError(
                "IQLearn does not support `packing=True` (or `eval_packing=True`): the temporal-difference term "
                "bootstraps from the next token of the same sequence, and packed rows join several sequences. "
                "Set `packing=False`."
            )
        if self.padding_free:
            raise ValueError(
                "IQLearn does not support `padding_free=True`: it concatenates sequences into one row, so the "
                "temporal-difference term would bootstrap across sequence boundaries. Set `padding_free=False`."
            )
        if self.loss_type != "nll":
            raise ValueError(
                f"IQLearn defines its own loss, so `loss_type` must stay 'nll', got {self.loss_type!r}. Use "
                "`td_coef=0` for plain SFT."
            )
        check_activation_offloading(self)
        if self.label_smoothing_factor > 0:
            raise ValueError("IQLearn does not support `label_smoothing_factor > 0`: it defines its own loss.")
