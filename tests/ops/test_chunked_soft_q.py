import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from trl_offline.ops.chunked_soft_q import chunked_soft_q_stats


def naive_logits(hidden, weight, bias, logit_scale=1.0, softcap=None):
    logits = hidden @ weight.T  # (N, V)
    if bias is not None:
        logits = logits + bias
    logits = (logit_scale * logits).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def make_inputs(n, h, v, dtype, with_bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=gen) / h**0.5).to(dtype).requires_grad_()
    bias = torch.randn(v, generator=gen).to(dtype).requires_grad_() if with_bias else None
    labels = torch.randint(0, v, (n,), generator=gen)
    grad_target, grad_lse = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    return hidden, weight, bias, labels, grad_target, grad_lse


def values_and_grads(fn, params, grad_target, grad_lse):
    """Runs `fn() -> (target, lse)`, backprops a random upstream gradient through both, returns values and grads."""
    for p in params:
        p.grad = None
    target, lse = fn()
    ((grad_target * target).sum() + (grad_lse * lse).sum()).backward()
    return target.detach(), lse.detach(), [p.grad.clone() for p in params]


# Guards the core contract: both outputs and all three gradients match the full-logits computation, for every tiling
# (chunk of 1, chunks that do and do not divide N, one chunk larger than N), with logit scaling and softcapping.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 4, 5, 64])
@pytest.mark.parametrize(("logit_scale", "softcap"), [(1.0, None), (0.5, 4.0)])
def test_values_and_grads_match_naive(dtype, with_bias, chunk_size, logit_scale, softcap):
    hidden, weight, bias, labels, grad_target, grad_lse = make_inputs(20, 16, 37, dtype, with_bias)
    params = [p for p in (hidden, weight, bias) if p is not None]

    def chunked():
        stats = chunked_soft_q_stats(
            hidden, weight, bias, labels, logit_scale=logit_scale, softcap=softcap, chunk_size=chunk_size
        )
        assert stats.target_logits.dtype == stats.logsumexp.dtype == torch.float32
        return stats.target_logits, stats.logsumexp

    def naive(cast):
        logits = naive_logits(
            *(None if p is None else p.to(cast) for p in (hidden, weight, bias)), logit_scale, softcap
        )
        return logits.gather(1, labels[:, None]).squeeze(1), logits.logsumexp(-1)

    target, lse, grads = values_and_grads(chunked, params, grad_target, grad_lse)
    if dtype == torch.float32:
        ref_target, ref_lse, ref_grads = values_and_grads(lambda: naive(dtype), params, grad_target, grad_lse)
        tol = {"atol": 1e-5, "rtol": 1e-5}
    else:
        # bf16 matmuls round the logits and gradients: compare to the same inputs computed in float32 ...
        ref_target, ref_lse, ref_grads = values_and_grads(lambda: naive(torch.float32), params, grad_target, grad_lse)
        tol = {"atol": 5e-2, "rtol": 5e-2}
        # ... and check we are no further from it than the plain bf16 lm_head path is
        bf16_target, _, bf16_grads = values_and_grads(lambda: naive(dtype), params, grad_target, grad_lse)
        assert (target - ref_target).abs().max() <= 2 * (bf16_target - ref_target).abs().max() + 1e-2
        for grad, bf16_grad, ref_grad in zip(grads, bf16_grads, ref_grads):
            assert grad.dtype == bf16_grad.dtype
            assert (grad.float() - ref_grad).abs().max() <= 2 * (bf16_grad.float() - ref_grad).abs().max() + 1e-2
    torch.testing.assert_close(target, ref_target, **tol)
    torch.testing.assert_close(lse, ref_lse, **tol)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad.float(), ref_grad.float(), **tol)


# Guards the detached statistics: entropy of the softmax and whether the label is the argmax (both True and False).
def test_entropy_and_is_top1_match_naive():
    hidden, weight, bias, labels, _, _ = make_inputs(30, 16, 37, torch.float32, with_bias=True)
    logits = naive_logits(hidden, weight, bias, 2.0, 5.0).detach()
    labels[::2] = logits.argmax(-1)[::2]  # half the rows take the top-1 token
    stats = chunked_soft_q_stats(hidden, weight, bias, labels, logit_scale=2.0, softcap=5.0, chunk_size=7)
    ref_entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    torch.testing.assert_close(stats.entropy, ref_entropy, atol=1e-5, rtol=1e-5)
    assert not stats.entropy.requires_grad
    assert stats.is_top1.dtype == torch.bool
    assert torch.equal(stats.is_top1, logits.argmax(-1) == labels)
    assert stats.is_top1.any() and not stats.is_top1.all()
    skipped = chunked_soft_q_stats(hidden, weight, bias, labels, with_stats=False)
    assert skipped.entropy is None and skipped.is_top1 is None


# Guards the tied-embedding case: the LM-head weight is also the input embedding, so its gradient sums the head and
# the embedding contributions, and every backbone parameter must get the same gradient as through `model(...).logits`.
def test_tied_embeddings_grads_match_full_model():
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=50,
        tie_word_embeddings=True,
    )
    model = AutoModelForCausalLM.from_config(config).float()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    input_ids = torch.randint(0, 50, (2, 9))
    labels = torch.randint(0, 50, (2 * 9,))
    grad_target, grad_lse = torch.randn(2 * 9), torch.randn(2 * 9)

    def chunked():
        hidden = model.model(input_ids).last_hidden_state.reshape(-1, 32)  # (N, H)
        head = model.get_output_embeddings()
        stats = chunked_soft_q_stats(hidden, head.weight, head.bias, labels, chunk_size=4)
        return stats.target_logits, stats.logsumexp

    def naive():
        logits = model(input_ids).logits.reshape(-1, 50).float()  # (N, V)
        return logits.gather(1, labels[:, None]).squeeze(1), logits.logsumexp(-1)

    params = list(model.parameters())
    *_, grads = values_and_grads(chunked, params, grad_target, grad_lse)
    *_, ref_grads = values_and_grads(naive, params, grad_target, grad_lse)
    for (name, _), grad, ref_grad in zip(model.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


# Guards batches with no scored position: outputs are empty but still in the graph, and backward gives zero grads.
def test_empty_batch_backward_gives_zero_grads():
    hidden, weight, bias, labels, _, _ = make_inputs(0, 8, 11, torch.float32, with_bias=True)
    stats = chunked_soft_q_stats(hidden, weight, bias, labels)
    assert stats.target_logits.shape == stats.logsumexp.shape == stats.entropy.shape == (0,)
    (stats.target_logits.sum() + stats.logsumexp.sum()).backward()
    assert hidden.grad.shape == (0, 8)
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    assert torch.equal(bias.grad, torch.zeros_like(bias))


# Guards the partial-gradient paths: a frozen head still gives hidden-state grads, and an unused output is fine.
def test_frozen_head_and_single_output():
    hidden, weight, bias, labels, _, grad_lse = make_inputs(9, 8, 11, torch.float32, with_bias=True)
    weight.requires_grad_(False)
    bias.requires_grad_(False)
    (grad_lse * chunked_soft_q_stats(hidden, weight, bias, labels, chunk_size=4).logsumexp).sum().backward()
    ref_hidden = hidden.detach().clone().requires_grad_()
    (grad_lse * naive_logits(ref_hidden, weight, bias).logsumexp(-1)).sum().backward()
    torch.testing.assert_close(hidden.grad, ref_hidden.grad)


# Guards autocast: the tile matmul runs in the autocast dtype, like `lm_head` under autocast, while gradients keep
# the parameters' float32 dtype.
def test_autocast_matches_autocast_lm_head():
    hidden, weight, bias, labels, grad_target, grad_lse = make_inputs(12, 16, 37, torch.float32, with_bias=True)
    params = [hidden, weight, bias]

    def chunked():
        stats = chunked_soft_q_stats(hidden, weight, bias, labels, chunk_size=5)
        return stats.target_logits, stats.logsumexp

    def naive():
        logits = torch.nn.functional.linear(hidden, weight, bias).float()
        return logits.gather(1, labels[:, None]).squeeze(1), logits.logsumexp(-1)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        target, lse, grads = values_and_grads(chunked, params, grad_target, grad_lse)
        ref_target, ref_lse, ref_grads = values_and_grads(naive, params, grad_target, grad_lse)
    torch.testing.assert_close(target, ref_target)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    for grad, ref_grad in zip(grads, ref_grads):
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, ref_grad, atol=3e-2, rtol=3e-2)


# Guards the hand-written backward against finite differences (float64, softcap and scale on, uneven tiles).
def test_gradcheck_float64():
    hidden, weight, bias, labels, _, _ = make_inputs(5, 3, 7, torch.float64, with_bias=True)

    def fn(hidden, weight, bias):
        stats = chunked_soft_q_stats(
            hidden, weight, bias, labels, logit_scale=1.5, softcap=2.0, chunk_size=2, with_stats=False
        )
        return stats.target_logits, stats.logsumexp

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))
