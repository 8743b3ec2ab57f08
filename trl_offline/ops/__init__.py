"""Memory-lean per-token statistics straight from hidden states: never the (batch, seq_len, vocab) logits."""

from .chunked_soft_q import SoftQStats, chunked_soft_q_stats
from .soft_q_head import SoftQOutput, SoftValueHead, add_soft_q_head, add_soft_value_head


__all__ = [
    "SoftQOutput",
    "SoftQStats",
    "SoftValueHead",
    "add_soft_q_head",
    "add_soft_value_head",
    "chunked_soft_q_stats",
]
