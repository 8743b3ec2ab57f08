"""Metrics of the imitation benchmark, in plain Python: diversity of samples (distinct-n, self-BLEU), the distance
between two distributions over answers, and rank correlation. Texts are sequences of tokens (strings of characters
for the offline kit's character tokenizer)."""

import math
from collections import Counter
from collections.abc import Sequence


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
