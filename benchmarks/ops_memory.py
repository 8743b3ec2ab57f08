"""Peak memory of forward + backward for the soft-Q statistics: full logits vs `chunked_soft_q_stats`.

Both paths compute, per token, the target logit and the logsumexp of `hidden @ weight.T`, and backpropagate a random
upstream gradient through both into the hidden states and the weight.

How memory is measured: each path runs in a fresh subprocess (this script re-run with `--path`), so neither sees the
other's allocator caches. On CUDA the number is `torch.cuda.max_memory_allocated()` minus the memory allocated once
the inputs exist: exact for tensors, which is what a training step competes for. On CPU it is the increase in the
process's peak resident set size (`ru_maxrss`) over the resident set size once the inputs exist: it counts
everything the step really touched (tensors, allocator overhead, oneDNN scratch), and a fresh process keeps earlier
work from hiding the peak. A tiny warm-up run before the inputs are allocated loads the kernels first, so their
one-off setup is not counted. (`torch.profiler`'s memory view was not used: it only sees allocations routed through
the profiler hooks and is heavier to parse.) The seconds printed beside are one unrepeated run: indicative only.

    python benchmarks/ops_memory.py                      # defaults: vocab 32000, hidden 256, tokens 4096, chunk 1024
    python benchmarks/ops_memory.py --quick              # a smaller smoke run
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import current_rss_bytes, peak_rss_bytes, provenance, write_json


MIB = 2**20


def _step(path, hidden, weight, labels, grad_target, grad_lse, chunk_size):
    """One forward + backward; returns the loss so the two paths can be checked against each other."""
    if path == "naive":
        logits = (hidden @ weight.T).float()  # (N, V)
        target, lse = logits.gather(1, labels[:, None]).squeeze(1), logits.logsumexp(-1)  # (N,), (N,)
    else:
        from trl_offline.ops.chunked_soft_q import chunked_soft_q_stats

        stats = chunked_soft_q_stats(hidden, weight, None, labels, chunk_size=chunk_size, with_stats=False)
        target, lse = stats.target_logits, stats.logsumexp  # (N,), (N,)
    loss = (grad_target * target).sum() + (grad_lse * lse).sum()
    loss.backward()
    return loss.item()


def _inputs(tokens, hidden_size, vocab, dtype, device):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=gen).to(device, dtype).requires_grad_()  # (N, H)
    weight = torch.randn(vocab, hidden_size, generator=gen).div_(hidden_size**0.5).to(device, dtype)  # (V, H)
    labels = torch.randint(0, vocab, (tokens,), generator=gen).to(device)  # (N,)
    grads = torch.randn(2, tokens, generator=gen).to(device)  # (2, N)
    return hidden, weight.requires_grad_(), labels, grads[0], grads[1]


def measure(args):
    """Runs in the child process: prints one JSON line with the peak memory increase of one path."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    _step(args.path, *_inputs(64, 16, 128, dtype, device), chunk_size=16)  # warm-up: load kernels, thread pools
    inputs = _inputs(args.tokens, args.hidden, args.vocab, dtype, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        peak_before, baseline = peak_rss_bytes(), current_rss_bytes()
    start = time.perf_counter()
    loss = _step(args.path, *inputs, chunk_size=args.chunk_size)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes()
    if device.type != "cuda" and peak <= peak_before:
        print(f"warning: the {args.path} step set no new RSS peak; its number is a lower bound", file=sys.stderr)
    print(json.dumps({"path": args.path, "peak_increase_bytes": peak - baseline, "seconds": seconds, "loss": loss}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="vocab 8000, tokens 1024, chunk 256: a smoke run")
    parser.add_argument(
        "--output", help="JSON to write (default: results/ops_memory.json; with --quick, none unless given)"
    )
    parser.add_argument("--path", choices=["naive", "chunked"], help=argparse.SUPPRESS)  # set in the subprocess
    args = parser.parse_args()
    if args.quick:
        args.vocab, args.tokens, args.chunk_size = 8000, 1024, 256
    elif args.output is None:
        args.output = str(Path(__file__).parent / "results" / "ops_memory.json")
    if args.path:
        return measure(args)

    results = {}
    for path in ("naive", "chunked"):
        forwarded = [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("quick", "output", "path")
        ]
        out = subprocess.run(
            [sys.executable, __file__, f"--path={path}", *forwarded], check=True, stdout=subprocess.PIPE, text=True
        ).stdout
        results[path] = json.loads(out.strip().splitlines()[-1])
    naive, chunked = results["naive"], results["chunked"]
    if abs(naive["loss"] - chunked["loss"]) > 1e-3 * max(1.0, abs(naive["loss"])):
        raise RuntimeError(f"The two paths disagree: loss {naive['loss']} vs {chunked['loss']}")
    ratio = naive["peak_increase_bytes"] / max(chunked["peak_increase_bytes"], 1)

    sizes = {k: getattr(args, k) for k in ("vocab", "hidden", "tokens", "chunk_size", "dtype", "device")}
    logits_mib = args.tokens * args.vocab * 4 / MIB
    print(f"{sizes}  (full float32 logits alone: {logits_mib:.0f} MiB)")
    print(f"{'path':<10}{'peak MiB':>12}{'seconds':>10}")
    for path, r in results.items():
        print(f"{path:<10}{r['peak_increase_bytes'] / MIB:>12.1f}{r['seconds']:>10.3f}")
    print(f"ratio naive / chunked: {ratio:.2f}x")

    record = {
        "benchmark": "peak memory increase of forward + backward (target logit + logsumexp)",
        **provenance(args.device),
        "method": "fresh subprocess per path; "
        + ("cuda max_memory_allocated" if args.device != "cpu" else "ru_maxrss"),
        "sizes": sizes,
        "results": {
            p: {"peak_mib": r["peak_increase_bytes"] / MIB, "seconds": r["seconds"]} for p, r in results.items()
        },
        "ratio_naive_over_chunked": ratio,
    }
    if args.output:
        write_json(args.output, record)
        plot(record, str(Path(args.output).with_suffix(".png")))


def plot(record: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"naive": "full logits", "chunked": "chunked_soft_q_stats"}
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.bar([labels[p] for p in record["results"]], [r["peak_mib"] for r in record["results"].values()],
           color=["#4c72b0", "#dd8452"])  # fmt: skip
    ax.set_ylabel("peak memory increase, MiB")
    sizes, device = record["sizes"], record["machine"]["device"]
    ax.set_title(f"{device}: {sizes['tokens']} tokens, vocab {sizes['vocab']}, hidden {sizes['hidden']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
