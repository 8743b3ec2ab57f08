"""Helpers the benchmark scripts share: one training step as `Trainer` runs it, CPU memory readings, timing summaries,
the config of the quality runs, the cost plots, and each result's provenance (the command and the machine a figure
came from)."""

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def current_rss_bytes() -> int:
    """Resident set size now (Linux); elsewhere the peak so far, which can only make an increase look smaller."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def machine(device: str) -> dict:
    """What every recorded figure is labelled with: the machine, the device and the library versions."""
    import transformers
    import trl

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "trl": trl.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
    }


def provenance(device: str) -> dict:
    """What a result's JSON record starts with: the command that produced it, as run from the repository root, and
    the machine it ran on."""
    return {"command": shlex.join(["python", os.path.relpath(sys.argv[0]), *sys.argv[1:]]), "machine": machine(device)}


def write_json(path: str, record: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


def cpu_run_args(
    output_dir: str, *, steps: int, batch_size: int, learning_rate: float, warmup_steps: int, seed: int
) -> dict:
    """The config fields every quality run shares, for any TRL or trl_offline config: a cosine schedule after
    `warmup_steps`, on the CPU in float32, with no checkpoints, trackers, logs or progress bars."""
    return dict(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=warmup_steps,
        seed=seed,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(trainer, batch: dict) -> float:
    """One optimizer step as `Trainer`'s loop runs it without gradient accumulation, minus callbacks and logging:
    `get_batch_samples`, `training_step` (inputs, forward, loss, metrics, backward), gradient clipping,
    `optimizer.step()`, `lr_scheduler.step()`, `zero_grad()`. Returns the loss."""
    model = trainer.model_wrapped
    batch_samples, num_items_in_batch = trainer.get_batch_samples(iter([dict(batch)]), 1, trainer.args.device)
    loss = trainer.training_step(model, batch_samples[0], num_items_in_batch)
    if trainer.args.max_grad_norm > 0:
        trainer.accelerator.clip_grad_norm_(model.parameters(), trainer.args.max_grad_norm)
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    model.zero_grad()
    return loss.item()


def tiny_batch(batch: dict, length: int) -> dict:
    """The first row of `batch`, every `(B, T)` tensor cut to `length` positions: a cheap step that creates the
    optimizer state and loads kernels before memory is measured."""
    tiny = {}
    for key, value in batch.items():
        if torch.is_tensor(value) and value.dim() == 2:
            # per-token reference log-probs are aligned with the T - 1 predicted positions
            value = value[:1, : length - 1 if key.endswith("logps") else length]
        elif torch.is_tensor(value):
            value = value[:1]
        tiny[key] = value
    return tiny


def summary(seconds: list[float]) -> dict:
    """Median and interquartile range of step times."""
    q1, median, q3 = statistics.quantiles(seconds, n=4, method="inclusive") if len(seconds) > 1 else seconds * 3
    return {"median_s": median, "q1_s": q1, "q3_s": q3, "iqr_s": q3 - q1, "seconds": seconds}


def time_steps(trainers: dict, batches: dict, warmup: int, device: torch.device) -> tuple[dict, dict, dict]:
    """Runs step `i` of every trainer on its batch `i`, the trainers taking turns (each leads in rotation), so machine
    noise hits all alike. Returns the step seconds after `warmup` steps, the CUDA peak increases over those steps
    (`max_memory_allocated` over `memory_allocated` before the step; zeros on CPU), and every step's loss."""
    names = list(trainers)
    seconds = {name: [] for name in names}
    cuda_peak = {name: {"peak_increase_bytes": 0, "baseline_bytes": 0, "new_peak": True} for name in names}
    losses = {name: [] for name in names}
    num_steps = len(batches[names[0]])
    for i in range(num_steps):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                baseline = torch.cuda.memory_allocated(device)
            tic = time.perf_counter()
            losses[name].append(train_step(trainers[name], batches[name][i]))
            sync(device)
            toc = time.perf_counter()
            if i >= warmup:
                seconds[name].append(toc - tic)
                increase = torch.cuda.max_memory_allocated(device) - baseline if device.type == "cuda" else 0
                if increase > cuda_peak[name]["peak_increase_bytes"]:
                    cuda_peak[name].update(peak_increase_bytes=increase, baseline_bytes=baseline)
        done = "warm-up" if i < warmup else ", ".join(f"{n} {s[-1]:.3f} s" for n, s in seconds.items())
        print(f"step {i + 1}/{num_steps}: {done}", flush=True)
    return seconds, cuda_peak, losses


def memory_in_subprocess(script: str, name: str, model_path: str, args, forwarded: tuple[str, ...]) -> dict:
    """Runs `script --measure-memory=name` in a fresh process (CPU peak memory: see the cost scripts' docstrings),
    forwarding the `forwarded` options of `args` and its `bf16` / `activation_checkpointing` flags; returns the JSON
    record it prints last."""
    options = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k in forwarded]
    flags = [f"--{flag.replace('_', '-')}" for flag in ("bf16", "activation_checkpointing") if getattr(args, flag)]
    command = [sys.executable, script, f"--measure-memory={name}", f"--model-path={model_path}", *options, *flags]
    out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def memory_in_subprocesses(script: str, names, model_path: str, args, forwarded: tuple[str, ...]) -> dict:
    """`memory_in_subprocess` for every trainer of `names`, `args.memory_repeats` times, the trainers taking turns.
    Each trainer keeps the record of its median run, plus every run's peak increase: one reading of the CPU peak RSS
    moves by a few percent from run to run."""
    if args.memory_repeats < 1:
        raise ValueError(f"`--memory-repeats` must be at least 1, got {args.memory_repeats}.")
    runs = {name: [] for name in names}
    for _ in range(args.memory_repeats):
        for name in names:
            runs[name].append(memory_in_subprocess(script, name, model_path, args, forwarded))
    medians = {}
    for name, records in runs.items():
        median = sorted(records, key=lambda r: r["peak_increase_bytes"])[len(records) // 2]
        medians[name] = {**median, "peak_increase_bytes_runs": [r["peak_increase_bytes"] for r in records]}
    return medians


def cost_plot_title(args) -> str:
    """The machine and the sizes a cost plot's figures came from."""
    device = (
        torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else f"CPU, {os.cpu_count()} cores"
    )
    return (
        f"{device}: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, sequence {args.seq_len}, "
        f"batch {args.batch_size}, {args.steps} timed steps" + (", bf16" if args.bf16 else "")
    )


def plot_cost(timing: dict, memory: dict, labels: dict, path: str, title: str) -> None:
    """Two bar charts, one bar per trainer: the median step time with its interquartile range, and the peak memory
    increase with the range of the repeated CPU readings (`peak_increase_bytes_runs`) where there are several."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(timing)
    ticks = [labels[name] for name in names]
    fig, (time_ax, memory_ax) = plt.subplots(1, 2, figsize=(5 + 1.6 * len(names), 4))
    medians = [timing[name]["median_s"] for name in names]
    below = [timing[name]["median_s"] - timing[name]["q1_s"] for name in names]
    above = [timing[name]["q3_s"] - timing[name]["median_s"] for name in names]
    time_ax.bar(ticks, medians, yerr=[below, above], capsize=3, color="#4c72b0")
    time_ax.set_ylabel("seconds per step (median, IQR)")
    mib = [memory[name]["peak_increase_bytes"] / 2**20 for name in names]
    runs = [[b / 2**20 for b in memory[name].get("peak_increase_bytes_runs", [memory[name]["peak_increase_bytes"]])]
            for name in names]  # fmt: skip
    below = [m - min(r) for m, r in zip(mib, runs)]
    above = [max(r) - m for m, r in zip(mib, runs)]
    memory_ax.bar(ticks, mib, yerr=[below, above], capsize=3, color="#dd8452")
    memory_ax.set_ylabel("peak memory increase, MiB (median, range)")
    for ax in (time_ax, memory_ax):
        ax.tick_params(axis="x", rotation=20, labelsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


# The options both cost scripts take, forwarded to their memory subprocesses (with each script's own)
COST_OPTIONS = ("vocab", "hidden", "layers", "heads", "seq_len", "prompt_len", "batch_size", "steps", "warmup")
COST_OPTIONS += ("memory_steps", "device", "seed")


def add_cost_arguments(parser, steps: int, trainers: str) -> None:
    """The model sizes, batch, steps and precision options of the cost scripts (defaults: the issue's sizes)."""
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per row; the rest is completion")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=steps, help="timed steps per trainer")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per trainer before them")
    parser.add_argument("--memory-steps", type=int, default=2, help="full-size steps in each CPU memory subprocess")
    parser.add_argument(
        "--memory-repeats", type=int, default=3, help="CPU memory subprocesses per trainer; the median is reported"
    )
    parser.add_argument("--bf16", action="store_true", help=f"bf16 mixed precision for {trainers}")
    parser.add_argument("--activation-checkpointing", action="store_true", help=f"for {trainers} (default off)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="vocab 4000, hidden 64, 2 layers, seq 128, batch 4")
    parser.add_argument("--model-path", help=argparse.SUPPRESS)  # set in the memory subprocess


def apply_quick_sizes(args) -> None:
    """`--quick`: small sizes, one warm-up step, one memory step and one memory reading; each script sets its own
    number of steps."""
    args.vocab, args.hidden, args.layers, args.seq_len, args.prompt_len = 4000, 64, 2, 128, 32
    args.batch_size, args.warmup, args.memory_steps, args.memory_repeats = 4, 1, 1, 1


# The optimizer settings of every trainer in a cost run, as TrainingArguments fields
COST_OPTIMIZER = dict(learning_rate=1e-4, optim="adamw_torch", max_grad_norm=1.0)


def finish_cost_arguments(parser, args, result_name: str) -> None:
    """What both cost scripts do after parsing: the default result path (none with `--quick`), the prompt-length
    check, and no hub."""
    if args.output is None and not args.quick:
        args.output = str(Path(__file__).parent / "results" / result_name)
    if not 0 < args.prompt_len < args.seq_len:
        parser.error("--prompt-len must be between 0 and --seq-len, exclusive")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def cost_record_fields(args, device: torch.device, timing: dict, memory: dict) -> dict:
    """The parts of a cost result's JSON record both scripts share: the optimizer and precision, how memory was
    measured, and each trainer's timing and memory figures (`results`, which each script extends)."""
    memory_method = (
        "cuda max_memory_allocated - memory_allocated before the step, max over timed steps"
        if device.type == "cuda"
        else "fresh subprocess per trainer; ru_maxrss increase over RSS after a tiny warm-up step (AdamW state "
        f"exists), over {args.memory_steps} full-size step(s); the median of {args.memory_repeats} such processes "
        "per trainer, the trainers taking turns"
    )
    results = {
        name: {
            **{key: timing[name][key] for key in ("median_s", "iqr_s", "q1_s", "q3_s")},
            "step_seconds": timing[name]["seconds"],
            "peak_increase_mib": memory[name]["peak_increase_bytes"] / 2**20,
            "peak_increase_mib_runs": [b / 2**20 for b in memory[name].get("peak_increase_bytes_runs", [])],
            "memory_baseline_mib": memory[name]["baseline_bytes"] / 2**20,  # RSS on CPU, allocated on CUDA
            "new_peak": memory[name]["new_peak"],
        }
        for name in timing
    }
    config = {**COST_OPTIMIZER, "bf16": args.bf16, "activation_checkpointing": args.activation_checkpointing}
    return {"config": config, "memory_method": memory_method, "results": results}


def build_cost_model(root: str, args) -> str:
    """The offline kit's randomly initialised Llama at the sizes of `args`, saved under `root`; returns its path."""
    from trl_offline.offline_kit import build_tiny_model

    return build_tiny_model(
        os.path.join(root, "model"),
        architecture="llama",
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        vocab_size=args.vocab,
        seed=args.seed,
    )
