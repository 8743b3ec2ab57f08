"""`chunked_soft_q_stats` on the device under test, against the full logits (`hidden @ weight.T + bias`, then the
target logit and the logsumexp) and against itself on the CPU: values and gradients, in float32, in bf16 and with
float32 inputs under bf16 autocast, with a tied and an untied LM head, in tiles that do and do not divide the rows."""

import copy

import pytest
import torch
import torch.nn.functional as F

from trl_offline.ops.chunked_soft_q import chunked_soft_q_stats


pytestmark = pytest.mark.gpu

NUM_ROWS, HIDDEN, VOCAB = 40, 64, 503  # an odd vocabulary: no matmul kernel gets a tidy multiple of 8
CHUNK_SIZES = [8, 12]  # 8 divides the 40 rows; 12 leaves a last tile of 4

# Float32: the tiles do the same float32 arithmetic as one full matmul, only summed in another order
FLOAT32 = dict(rtol=1e-5, atol=1e-5)
# bf16 (inputs, or matmuls under autocast): 8 significant bits round each logit and gradient entry by up to 2^-8
# relative before the float32 sums; the tighter check is against the plain LM head in the same precision, below
BFLOAT16 = dict(rtol=5e-2, atol=5e-2)


class LMHead(torch.nn.Module):
    """Final hidden states and the LM head that reads them. Tied: the head's weight is the input embedding, which
    also makes the hidden states, so its gradient sums both uses. Untied: the hidden states are a leaf and the head
    has a weight and a bias of its own."""

    def __init__(self, tied: bool, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.tied = tied
        if tied:
            self.embedding = torch.nn.Parameter(torch.randn(VOCAB, HIDDEN, generator=generator) / HIDDEN**0.5)
            self.mix = torch.nn.Parameter(torch.randn(HIDDEN, HIDDEN, generator=generator) / HIDDEN**0.5)
            self.register_buffer("input_ids", torch.randint(0, VOCAB, (NUM_ROWS,), generator=generator))
        else:
            self.hidden = torch.nn.Parameter(torch.randn(NUM_ROWS, HIDDEN, generator=generator))
            self.weight = torch.nn.Parameter(torch.randn(VOCAB, HIDDEN, generator=generator) / HIDDEN**0.5)
            self.bias = torch.nn.Parameter(torch.randn(VOCAB, generator=generator))
        self.register_buffer("labels", torch.randint(0, VOCAB, (NUM_ROWS,), generator=generator))
        # Random upstream gradients of the two outputs, so that both backward terms count
        self.register_buffer("grad_target", torch.randn(NUM_ROWS, generator=generator))
        self.register_buffer("grad_lse", torch.randn(NUM_ROWS, generator=generator))

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`(N, H)` hidden states, the `(V, H)` head weight and its `(V,)` bias (or `None`)."""
        if self.tied:
            return torch.tanh(self.embedding[self.input_ids] @ self.mix), self.embedding, None
        return self.hidden, self.weight, self.bias


def chunked(head: LMHead, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    hidden, weight, bias = head.inputs()
    stats = chunked_soft_q_stats(hidden, weight, bias, head.labels, chunk_size=chunk_size)
    assert stats.target_logits.dtype == stats.logsumexp.dtype == torch.float32
    return stats.target_logits, stats.logsumexp


def naive(head: LMHead) -> tuple[torch.Tensor, torch.Tensor]:
    """The target logit and the logsumexp from the full `(N, V)` logits, which `log_softmax` ties together."""
    hidden, weight, bias = head.inputs()
    logits = F.linear(hidden, weight, bias).float()  # (N, V)
    target = logits.gather(1, head.labels[:, None]).squeeze(1)  # (N,)
    lse = logits.logsumexp(-1)  # (N,)
    log_probs = logits.log_softmax(-1).gather(1, head.labels[:, None]).squeeze(1)  # (N,)
    torch.testing.assert_close(target - lse, log_probs, rtol=1e-5, atol=1e-5)
    return target, lse


def values_and_grads(fn, head: LMHead) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """`fn(head) -> (target, lse)`, and the gradient of every parameter of `head` under the upstream gradients."""
    head.zero_grad(set_to_none=True)
    target, lse = fn(head)
    ((head.grad_target * target).sum() + (head.grad_lse * lse).sum()).backward()
    return target.detach(), lse.detach(), {name: p.grad.clone() for name, p in head.named_parameters()}


def max_error(got, want) -> float:
    return (got.float().cpu() - want.float().cpu()).abs().max().item()


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("precision", ["float32", "bfloat16", "autocast_bf16"])
def test_values_and_gradients_match_the_full_logits(device, precision, tied, chunk_size):
    head = LMHead(tied).to(device)
    if precision == "bfloat16":
        head = head.to(torch.bfloat16)
    exact_head = copy.deepcopy(head).float()  # the same (possibly bf16-rounded) numbers, computed in float32
    exact_target, exact_lse, exact_grads = values_and_grads(naive, exact_head)

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "autocast_bf16")
    with autocast:
        target, lse, grads = values_and_grads(lambda h: chunked(h, chunk_size), head)
        plain_target, plain_lse, plain_grads = values_and_grads(naive, head)  # the plain LM head, same precision
    assert target.device.type == device.type

    tolerance = FLOAT32 if precision == "float32" else BFLOAT16
    torch.testing.assert_close(target, exact_target, **tolerance)
    torch.testing.assert_close(lse, exact_lse, **tolerance)
    for name, grad in grads.items():
        assert grad.dtype == head.get_parameter(name).dtype, name  # float32 parameters keep float32 gradients
        torch.testing.assert_close(grad.float(), exact_grads[name], **tolerance, msg=lambda m, n=name: f"{n}: {m}")
    if precision != "float32":
        # Rounded no worse than the full logits in the same precision are (2x, and a little for the summation order)
        assert max_error(target, exact_target) <= 2 * max_error(plain_target, exact_target) + 1e-2
        assert max_error(lse, exact_lse) <= 2 * max_error(plain_lse, exact_lse) + 1e-2
        for name, grad in grads.items():
            bound = 2 * max_error(plain_grads[name], exact_grads[name]) + 1e-2
            assert max_error(grad, exact_grads[name]) <= bound, name


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_float32_on_the_device_matches_the_cpu(device, tied, chunk_size):
    cpu_target, cpu_lse, cpu_grads = values_and_grads(lambda h: chunked(h, chunk_size), LMHead(tied))
    target, lse, grads = values_and_grads(lambda h: chunked(h, chunk_size), LMHead(tied).to(device))
    torch.testing.assert_close(target.cpu(), cpu_target, **FLOAT32)
    torch.testing.assert_close(lse.cpu(), cpu_lse, **FLOAT32)
    assert grads.keys() == cpu_grads.keys()
    for name, grad in grads.items():
        assert grad.device.type == device.type, name
        torch.testing.assert_close(grad.cpu(), cpu_grads[name], **FLOAT32, msg=lambda m, n=name: f"{n}: {m}")
