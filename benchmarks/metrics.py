"""Metrics of the benchmarks. The imitation benchmark's, in plain Python: diversity of samples (distinct-n,
self-BLEU), the distance between two distributions over answers, and rank correlation; texts are sequences of tokens
(strings of characters for the offline kit's character tokenizer). The frontier benchmark's, in torch: KL(pi || pi_ref)
of a policy's sampled completions, summed over their tokens (`sequence_kl`, `completion_kl`)."""

import math
from collections import Counter
from collections.abc import Sequence

import torch


def ngrams(tokens: Sequence, n: int) -> list[tuple]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[Sequence], n: int) -> float:
    """Unique n-grams over all n-grams of `texts` (Li et al. 2016, as A-LoL reports it); 0 when there are none."""
    all_ngrams = [gram for text in texts for gram in ngrams(text, n)]
    return len(set(all_ngrams)) / len(all_ngrams) if all_ngrams else 0.0


def bleu(hypothesis: Sequence, references: Sequence[Sequence], max_n: int = 4, epsilon: float = 0.1) -> float:
    """Sentence BLEU (Papineni et al. 2002) with uniform weights up to `max_n`: the geometric mean of the clipped
    n-gram precisions times the brevity penalty. A precision with no matching n-gram counts `epsilon` matches instead
    of 0 (smoothing method 1 of Chen and Cherry 2014), so one missing order does not zero the score."""
    if not hypothesis:
        return 0.0
    log_precisions = []
    for n in range(1, max_n + 1):
        counts = Counter(ngrams(hypothesis, n))
        total = sum(counts.values())
        if total == 0:  # the hypothesis is shorter than n: that order is left out
            continue
        max_reference_counts = Counter()
        for reference in references:
            for gram, count in Counter(ngrams(reference, n)).items():
                max_reference_counts[gram] = max(max_reference_counts[gram], count)
        clipped = sum(min(count, max_reference_counts[gram]) for gram, count in counts.items())
        log_precisions.append(math.log((clipped or epsilon) / total))
    # The brevity penalty uses the reference length closest to the hypothesis' (the shorter one on a tie)
    length = len(hypothesis)
    closest = min((len(r) for r in references), key=lambda r: (abs(r - length), r))
    brevity = 1.0 if length > closest else math.exp(1 - closest / length)
    return brevity * math.exp(sum(log_precisions) / len(log_precisions))


def self_bleu(texts: Sequence[Sequence], max_n: int = 4) -> float:
    """Mean BLEU of each text against all the others as references (Zhu et al. 2018): 1.0 when all are the same,
    lower the more they differ."""
    if len(texts) < 2:
        raise ValueError(f"self-BLEU needs at least 2 texts, got {len(texts)}.")
    return sum(bleu(text, texts[:i] + texts[i + 1 :], max_n) for i, text in enumerate(texts)) / len(texts)


def total_variation(expert: dict, model: dict) -> float:
    """Total variation distance between the expert's distribution and the model's, given the model's probabilities
    of the expert's answers only: the model's remaining mass, `1 - sum(model.values())`, lies on answers the expert
    never gives."""
    outside = max(1.0 - sum(model.values()), 0.0)
    return 0.5 * (sum(abs(p - model.get(answer, 0.0)) for answer, p in expert.items()) + outside)


def kl_divergence(expert: dict, model: dict) -> float:
    """KL(expert || model) in nats: the expected extra code length of the expert's answers under the model, the
    quantity maximum likelihood on the expert's samples minimises."""
    return sum(p * (math.log(p) - math.log(model[answer])) for answer, p in expert.items() if p > 0)


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    result = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in order[start : end + 1]:
            result[i] = (start + end) / 2 + 1
        start = end + 1
    return result


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"need two sequences of the same length >= 2, got {len(x)} and {len(y)}.")
    mean_x, mean_y = sum(x) / len(x), sum(y) / len(y)
    covariance = sum((a - mean_x) * (b - mean_y) for a, b in zip(x, y))
    spread = math.sqrt(sum((a - mean_x) ** 2 for a in x) * sum((b - mean_y) ** 2 for b in y))
    return covariance / spread if spread else 0.0


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's correlation of the ranks (ties averaged)."""
    return pearson(ranks(x), ranks(y))


def until_eos_mask(completion_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """`(B, L)` 1 on each sampled completion's tokens up to and including its first `eos_token_id`, 0 on what
    generation adds after it (padding, or a pad token equal to eos); a completion without eos, cut at the length
    limit, is all ones."""
    is_eos = (completion_ids == eos_token_id).long()
    eos_before = is_eos.cumsum(-1) - is_eos  # eos tokens strictly before each position
    return (eos_before == 0).long()


def sequence_kl(policy_logits: torch.Tensor, reference_logits: torch.Tensor, completion_mask: torch.Tensor):
    """KL(pi || pi_ref) of each sequence, estimated from one completion sampled from `pi`: the sum over its tokens of
    the full-vocabulary KL between the two next-token distributions at that token's position.

    By the chain rule, KL(pi || pi_ref) over whole completions is the expected sum over steps of the per-step KL of
    the next-token distributions, so the estimate is unbiased; it is the summed log-ratio `log pi(y|x) / pi_ref(y|x)`
    with each step's sampled token averaged out (Rao-Blackwellised): lower variance, and never negative. It is exact
    for the completions' distribution as sampled, i.e. cut at the length limit for those that reach it.

    Args:
        policy_logits (`torch.Tensor` of shape `(B, T, V)`): the policy's logits over prompt + completion tokens.
        reference_logits (`torch.Tensor` of shape `(B, T, V)`): the reference's, over the same tokens.
        completion_mask (`torch.Tensor` of shape `(B, T)`): 1 on the completion's tokens (the eos ending it
            included), 0 on the prompt and padding. The logits at position `t - 1` predict token `t`.

    Returns:
        `torch.Tensor` of shape `(B,)`: the estimates, in nats.
    """
    policy_logps = policy_logits[:, :-1].log_softmax(-1)  # (B, T - 1, V)
    reference_logps = reference_logits[:, :-1].log_softmax(-1)  # (B, T - 1, V)
    # sum_v pi(v) (log pi(v) - log pi_ref(v)) at each position
    per_token = torch.nn.functional.kl_div(reference_logps, policy_logps, log_target=True, reduction="none").sum(-1)
    return (per_token * completion_mask[:, 1:]).sum(-1)  # (B,)


@torch.no_grad()
def completion_kl(policy, reference, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask):
    """`sequence_kl` of sampled completions, from the two causal LMs' forward passes over them.

    Args:
        policy, reference: Causal LMs over the same vocabulary.
        input_ids (`torch.Tensor` of shape `(B, T)`): prompts (padded on either side) followed by their completions,
            as `generate` returns them.
        attention_mask (`torch.Tensor` of shape `(B, T)`): 0 on the prompts' padding. Positions count from each
            row's first real token, as `generate` counts them, so a left-padded row scores as it would alone.
        completion_mask (`torch.Tensor` of shape `(B, T)`): see `sequence_kl`.

    Returns:
        `torch.Tensor` of shape `(B,)`, float32: the estimates, in nats.
    """
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    policy_logits = policy(**inputs).logits.float()
    reference_logits = reference(**inputs).logits.float()
    return sequence_kl(policy_logits, reference_logits, completion_mask)
