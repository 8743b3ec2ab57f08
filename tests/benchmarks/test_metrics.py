"""The imitation benchmark's metrics against values worked out by hand."""

import itertools
import math
import sys

import pytest
import torch
from launch_utils import ROOT


sys.path.insert(0, str(ROOT / "benchmarks"))
from metrics import (  # noqa: E402
    bleu,
    completion_kl,
    distinct_n,
    kl_divergence,
    ranks,
    self_bleu,
    sequence_kl,
    spearman,
    total_variation,
    until_eos_mask,
)


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


# KL(pi || pi_ref) of sampled completions. A toy vocabulary: a, b and eos; completions of at most 3 tokens, after a
# 2-token prompt. Each "model" is an explicit next-token distribution for every prefix of the completion.
A, B, EOS = 0, 1, 2
PROMPT = [B, A]
MAX_LENGTH = 3


def toy_model(seed: int) -> dict[tuple, torch.Tensor]:
    """A random next-token distribution over (a, b, eos) for every completion prefix that does not end the
    completion (no eos, shorter than `MAX_LENGTH`)."""
    generator = torch.Generator().manual_seed(seed)
    prefixes = [p for n in range(MAX_LENGTH) for p in itertools.product((A, B), repeat=n)]
    return {p: torch.rand(3, generator=generator, dtype=torch.float64).add(0.1).softmax(-1) for p in prefixes}


def every_completion() -> list[tuple]:
    """Every completion a sampler that stops at eos or after `MAX_LENGTH` tokens can return."""
    ended = [(*p, EOS) for n in range(MAX_LENGTH) for p in itertools.product((A, B), repeat=n)]
    return ended + list(itertools.product((A, B), repeat=MAX_LENGTH))  # the last ones cut at the length limit


def probability(model: dict, completion: tuple) -> float:
    return math.prod(model[completion[:t]][token].item() for t, token in enumerate(completion))


def toy_logits(model: dict, completions: list[tuple], garbage_seed: int) -> torch.Tensor:
    """`(N, len(PROMPT) + MAX_LENGTH, 3)` logits over prompt + completion: the model's next-token log-probabilities
    where they predict a completion token, random numbers everywhere else (predicting the prompt, after the end)."""
    generator = torch.Generator().manual_seed(garbage_seed)
    logits = torch.randn(len(completions), len(PROMPT) + MAX_LENGTH, 3, generator=generator, dtype=torch.float64)
    for i, completion in enumerate(completions):
        for t in range(len(completion)):  # the logits at position len(PROMPT) + t - 1 predict completion token t
            logits[i, len(PROMPT) + t - 1] = model[completion[:t]].log()
    return logits


def toy_completion_mask(completions: list[tuple]) -> torch.Tensor:
    mask = torch.zeros(len(completions), len(PROMPT) + MAX_LENGTH, dtype=torch.long)
    for i, completion in enumerate(completions):
        mask[i, len(PROMPT) : len(PROMPT) + len(completion)] = 1
    return mask


def test_sequence_kl_is_unbiased_for_the_exact_kl_over_whole_completions():
    policy, reference = toy_model(0), toy_model(1)
    completions = every_completion()
    pi = [probability(policy, y) for y in completions]
    assert sum(pi) == pytest.approx(1.0, abs=1e-12)
    exact = sum(p * math.log(p / probability(reference, y)) for p, y in zip(pi, completions))
    assert exact > 0.05

    estimates = sequence_kl(
        toy_logits(policy, completions, garbage_seed=2),
        toy_logits(reference, completions, garbage_seed=3),  # other garbage: prompt and padding must not count
        toy_completion_mask(completions),
    )
    assert estimates.dtype == torch.float64 and estimates.shape == (len(completions),)
    assert sum(p * e for p, e in zip(pi, estimates.tolist())) == pytest.approx(exact, rel=1e-12)
    # Rao-Blackwellised: never negative, unlike the summed log-ratio of the sampled tokens it averages
    log_ratios = [math.log(p / probability(reference, y)) for p, y in zip(pi, completions)]
    assert min(log_ratios) < 0 <= estimates.min().item()
    assert sum(p * r for p, r in zip(pi, log_ratios)) == pytest.approx(exact, rel=1e-12)


def test_sequence_kl_of_a_one_token_completion_is_that_step_s_kl_by_hand():
    policy, reference = torch.tensor([0.5, 0.25, 0.25]), torch.tensor([0.25, 0.25, 0.5])
    logits = torch.zeros(1, 3, 3)
    logits[0, 1] = policy.log()
    reference_logits = torch.zeros(1, 3, 3)
    reference_logits[0, 1] = reference.log()
    mask = torch.tensor([[0, 0, 1]])
    # 0.5 log 2 + 0.25 log 1 + 0.25 log 0.5
    assert sequence_kl(logits, reference_logits, mask).item() == pytest.approx(0.25 * math.log(2), rel=1e-6)


def test_until_eos_mask_keeps_the_first_eos_and_drops_what_follows():
    eos, pad = 9, 0
    completions = torch.tensor(
        [[5, 6, eos, pad, pad], [eos, 5, eos, eos, 6], [5, 6, 7, 8, 5], [5, eos, eos, eos, eos]]
    )
    assert until_eos_mask(completions, eos).tolist() == [
        [1, 1, 1, 0, 0],
        [1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1],  # cut at the length limit: every token counts
        [1, 1, 0, 0, 0],  # a pad token equal to eos
    ]


@pytest.fixture(scope="module")
def two_tiny_models(tmp_path_factory):
    """Two tiny GPT-2s of different seeds with the kit's tokenizer, their LM heads scaled up so that their next-token
    distributions are peaked and differ (at initialisation both are nearly uniform). GPT-2's absolute position
    embeddings make a row's positions matter (Llama's rotary ones see only relative positions)."""
    from transformers import AutoModelForCausalLM

    from trl_offline.offline_kit import build_tiny_model

    models = []
    for seed in (0, 1):
        model = AutoModelForCausalLM.from_pretrained(
            build_tiny_model(str(tmp_path_factory.mktemp(f"m{seed}")), architecture="gpt2", seed=seed)
        )
        with torch.no_grad():
            model.lm_head.weight.mul_(30)
        models.append(model.eval())
    return models


def test_completion_kl_counts_completion_tokens_only_and_ignores_left_padding(two_tiny_models):
    policy, reference = two_tiny_models
    eos, pad = policy.config.eos_token_id, policy.config.pad_token_id
    # Two rows as `generate` returns them: prompts left-padded to 5 tokens; the first completion ends with eos and
    # is padded after it, the second is cut at the length limit
    prompts = [[40, 41, 42], [43, 44, 45, 46, 47]]
    completions = [[50, 51, eos, pad], [52, 53, 54, 55]]
    input_ids = torch.tensor([[pad, pad, *prompts[0], *completions[0]], [*prompts[1], *completions[1]]])
    attention_mask = torch.tensor([[0, 0] + [1] * 7, [1] * 9])
    completion_mask = torch.cat(
        [torch.zeros(2, 5, dtype=torch.long), until_eos_mask(torch.tensor(completions), eos)], dim=-1
    )
    estimates = completion_kl(policy, reference, input_ids, attention_mask, completion_mask)

    # By hand: each row alone, unpadded, its completion up to eos; the KL of the two next-token distributions before
    # each completion token, summed
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        kept = completion[: completion.index(eos) + 1] if eos in completion else completion
        ids = torch.tensor([prompt + kept])
        with torch.no_grad():
            p, q = policy(ids).logits[0].softmax(-1), reference(ids).logits[0].softmax(-1)
        expected = sum(
            (p[t - 1] * (p[t - 1].log() - q[t - 1].log())).sum().item() for t in range(len(prompt), ids.shape[1])
        )
        assert expected > 0.1
        assert estimates[row].item() == pytest.approx(expected, rel=1e-4)


def test_kl_is_zero_when_the_policy_is_the_reference(two_tiny_models):
    policy = two_tiny_models[0]
    input_ids = torch.tensor([[40, 41, 42, 50, 51, policy.config.eos_token_id]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1]])
    assert completion_kl(policy, policy, input_ids, torch.ones_like(mask), mask).tolist() == [0.0]
    # the same distributions from logits shifted by a constant
    logits = torch.randn(2, 4, 6)
    assert sequence_kl(logits, logits + 3.0, torch.ones(2, 4)).abs().max().item() < 1e-5
