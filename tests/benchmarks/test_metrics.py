"""The imitation benchmark's metrics against values worked out by hand."""

import math
import sys

import pytest
from launch_utils import ROOT


sys.path.insert(0, str(ROOT / "benchmarks"))
from metrics import bleu, distinct_n, kl_divergence, ranks, self_bleu, spearman, total_variation  # noqa: E402


def test_distinct_n_counts_unique_ngrams_over_all_texts():
    # bigrams ab, bc, ab, bd: 3 unique of 4
    assert distinct_n(["abc", "abd"], 2) == 0.75
    assert distinct_n(["abc", "abc"], 3) == 0.5
    assert distinct_n(["ab"], 3) == 0.0  # no trigram at all


def test_bleu_by_hand():
    assert bleu("abcd", ["abcd"]) == pytest.approx(1.0)
    # precisions 4/4, 1/3 (ab), 0 -> 0.1/2, 0 -> 0.1/1; same length, so no brevity penalty
    assert bleu("abcd", ["abdc"]) == pytest.approx((1 * (1 / 3) * 0.05 * 0.1) ** 0.25)
    # every unigram and bigram matches, no trigram exists; brevity penalty exp(1 - 4/2)
    assert bleu("ab", ["abcd"]) == pytest.approx(math.exp(-1))
    # the closest reference length sets the penalty: "abc" (3) rather than "abcdef" (6)
    assert bleu("ab", ["abcdef", "abc"]) == pytest.approx(math.exp(1 - 3 / 2))
    assert bleu("", ["abc"]) == 0.0


def test_self_bleu_is_one_for_identical_texts_and_lower_for_different_ones():
    assert self_bleu(["abcd", "abcd", "abcd"]) == pytest.approx(1.0)
    assert self_bleu(["abcd", "abdc"]) == pytest.approx((1 * (1 / 3) * 0.05 * 0.1) ** 0.25)
    with pytest.raises(ValueError, match="at least 2"):
        self_bleu(["abc"])


def test_total_variation_counts_the_model_mass_outside_the_expert_answers():
    assert total_variation({"a": 0.5, "b": 0.5}, {"a": 0.5, "b": 0.5}) == pytest.approx(0.0)
    # 0.2 of the model's mass is on answers the expert never gives
    assert total_variation({"a": 0.5, "b": 0.5}, {"a": 0.5, "b": 0.3}) == pytest.approx(0.2)
    assert total_variation({"a": 1.0}, {"a": 0.0}) == pytest.approx(1.0)


def test_kl_divergence_by_hand():
    assert kl_divergence({"a": 0.5, "b": 0.5}, {"a": 0.25, "b": 0.5}) == pytest.approx(0.5 * math.log(2))
    assert kl_divergence({"a": 1.0, "b": 0.0}, {"a": 0.5, "b": 0.5}) == pytest.approx(math.log(2))


def test_ranks_share_ties_and_spearman_by_hand():
    assert ranks([3, 1, 2, 2]) == [4, 1, 2.5, 2.5]
    assert spearman([1, 2, 3], [10, 20, 35]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # ranks (1, 2, 3, 4) and (1.5, 1.5, 3.5, 3.5): covariance 4, variances 5 and 4
    assert spearman([1, 2, 3, 4], [1, 1, 2, 2]) == pytest.approx(4 / math.sqrt(20))
    with pytest.raises(ValueError, match="same length"):
        spearman([1, 2], [1])
