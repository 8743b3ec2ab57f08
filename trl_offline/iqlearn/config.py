from dataclasses import dataclass, field

from transformers.utils import logging
from trl import SFTConfig

from ..offline_config import check_activation_offloading


logger = logging.get_logger(__name__)


@dataclass
class IQLearnConfig(SFTConfig):
    r"""
    Configuration class for the [`IQLearnTrainer`].

    IQLearn (Wulfmeier et al. 2024, arXiv 2409.01369) is supervised fine-tuning plus a temporal-difference
    regulariser on the reward the model implies, so this class is [`~trl.SFTConfig`] with a few more fields. Every SFT
    field keeps its meaning, except the few that IQLearn cannot honour, which are refused with an error rather than
    run wrong (see below).

    Parameters:
        > Parameters that control the IQLearn objective

        soft_value (`str`, *optional*, defaults to `"head"`):
            The value `V(s)` of Eq. 14, with `Q(s, a) = V(s) + log pi(a|s)`:

            - `"head"`: a learned value `v_phi(s)`, a zero-initialised linear head on the model's final hidden state
              trained with it at the same learning rate. The loss then ignores the level of the logits at each
              position, which on a pretrained model is arbitrary: choose it to fine-tune a pretrained model. The head
              is saved beside the model as `soft_value_head.safetensors` (the model itself stays a plain causal LM)
              and is needed to extract rewards.
            - `"logsumexp"`: `V(s) = logsumexp` of the logits, which makes the logits themselves the Q-values. From a
              pretrained start its TD term is large (the logits' levels are far from 0) and can undo the model.
        soft_value_backprop (`bool`, *optional*, defaults to `False`):
            With `soft_value="head"`, whether the value head's gradient flows into the model's hidden states. By
            default the head reads them detached.
        td_coef (`float`, *optional*, defaults to `0.03`):
            Weight `lambda` of the temporal-difference term `(Q(s, a) - gamma * V(s'))^2` added to the per-token
            negative log-likelihood (Eq. 14 of the paper). `0.0` is exactly SFT. Its gradient weighs each token's
            likelihood gradient by `1 - 2 * lambda * r_t`, `r_t` the token's implicit reward: tokens likelier than the
            value expects are learned less, others more, which spreads probability over the demonstrated
            continuations. That helps where SFT overfits (its samples less diverse than the demonstrations; raise it
            to 0.1-0.3) and costs task success where the model is still learning the task (a pretrained model early
            in fine-tuning). The default kept SFT's task success on both starts of the imitation benchmark.
        gamma (`float`, *optional*, defaults to `1.0`):
            Discount of the next state's value in the implicit reward. Text episodes are short and end at EOS, so
            no discount is needed; with `gamma=1` the implicit rewards of a sequence add up to its soft return.
        logits_chunk_size (`int`, *optional*, defaults to `1024`):
            Number of token positions whose logits are materialised at once when computing `Q(s, a)` and `V(s)`.
            The `(batch, seq_len, vocab)` logits are never built; a smaller chunk lowers peak memory at a small
            speed cost.

        > Packing and padding-free batches

        `packing`, `packing_strategy`, `eval_packing` and `padding_free` work as in SFT. A packed or padding-free row
        joins several sequences, marked by `position_ids` that restart at 0; each sequence is its own episode: its
        last action never bootstraps from the next sequence, and the attention does not cross the boundary either,
        so the loss and gradients are those of the same sequences in padded rows. The exception is
        `packing_strategy="wrapped"`, which concatenates the sequences and cuts the stream into rows without marking
        where one ends: the model attends across them, as under SFT, and the TD term too treats each packed row as one
        episode (a warning says so). Keep the default `"bfd"` to keep sequences apart. `eval_packing=True` needs
        padding-free batches (`packing=True` or `padding_free=True`), the only ones in which SFT's collator marks the
        boundaries; without them it is refused.

        > Parameters from [`~trl.SFTConfig`] that IQLearn refuses

        `loss_type` other than `"nll"` and `label_smoothing_factor > 0`: IQLearn defines its own loss.
    """

    soft_value: str = field(
        default="head",
        metadata={
            "help": "The value V(s) of Eq. 14, with Q(s, a) = V(s) + log pi(a|s): 'head', a learned linear head on the "
            "final hidden state (indifferent to the logits' level; for pretrained models), or 'logsumexp', the "
            "logsumexp of the logits (the logits are the Q-values).",
            "choices": ["head", "logsumexp"],
        },
    )
    soft_value_backprop: bool = field(
        default=False,
        metadata={
            "help": "With soft_value='head', whether the value head's gradient flows into the model; by default the "
            "head reads the hidden states detached."
        },
    )
    td_coef: float = field(
        default=0.03,
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
        if self.soft_value not in ("head", "logsumexp"):
            raise ValueError(f"`soft_value` must be 'head' or 'logsumexp', got {self.soft_value!r}.")
        if self.soft_value_backprop and self.soft_value != "head":
            raise ValueError(
                "`soft_value_backprop=True` lets the value head's gradient into the model, so it needs "
                f"`soft_value='head'`, got {self.soft_value!r}."
            )
        if self.td_coef < 0:
            raise ValueError(f"`td_coef` must be >= 0 (0 is plain SFT), got {self.td_coef}.")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"`gamma` must be in (0, 1], got {self.gamma}.")
        if self.logits_chunk_size < 1:
            raise ValueError(f"`logits_chunk_size` must be >= 1, got {self.logits_chunk_size}.")
        padding_free_batches = self.padding_free or (self.packing and self.packing_strategy != "wrapped")
        if self.eval_packing and self.packing_strategy != "wrapped" and not padding_free_batches:
            # SFT's collator keeps the packed rows' boundaries only in padding-free batches; otherwise the packed
            # evaluation rows get an all-ones attention mask and their sequences would run into each other
            raise ValueError(
                "`eval_packing=True` without padding-free batches would let the packed evaluation sequences attend "
                "to, and bootstrap from, each other. Set `packing=True` or `padding_free=True` as well, or "
                "`eval_packing=False`."
            )
        if (self.packing or self.eval_packing) and self.packing_strategy == "wrapped":
            logger.warning(
                "`packing_strategy='wrapped'` joins sequences without marking their boundaries, so IQLearn's "
                "temporal-difference term treats each packed row as one episode and bootstraps across the sequences "
                "it joins (the model attends across them too, as under SFT). Use `packing_strategy='bfd'` to keep "
                "each sequence its own episode."
            )
        if self.loss_type != "nll":
            raise ValueError(
                f"IQLearn defines its own loss, so `loss_type` must stay 'nll', got {self.loss_type!r}. Use "
                "`td_coef=0` for plain SFT."
            )
        check_activation_offloading(self)
        if self.label_smoothing_factor > 0:
            raise ValueError("IQLearn does not support `label_smoothing_factor > 0`: it defines its own loss.")
