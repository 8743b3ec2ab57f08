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


def same_batches(a: list[dict], b: list[dict]) -> bool:
    """Whether two trainers collated the same batches, key for key (tensors and, in padding-free batches, ints)."""

    def equal(x, y):
        return torch.equal(x, y) if torch.is_tensor(x) else x == y

    return len(a) == len(b) and all(x.keys() == y.keys() and all(equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


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
    (`max_memory_allocated` over `memory_allocated` before the step; zeros on CPU) with the largest
    `max_memory_allocated` itself (`peak_bytes`: every trainer's state counted), and every step's loss."""
    names = list(trainers)
    seconds = {name: [] for name in names}
    cuda_peak = {
        name: {"peak_increase_bytes": 0, "baseline_bytes": 0, "peak_bytes": 0, "new_peak": True} for name in names
    }
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
                peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
                increase = peak - baseline if device.type == "cuda" else 0
                if increase > cuda_peak[name]["peak_increase_bytes"]:
                    cuda_peak[name].update(peak_increase_bytes=increase, baseline_bytes=baseline)
                cuda_peak[name]["peak_bytes"] = max(cuda_peak[name]["peak_bytes"], peak)
        done = "warm-up" if i < warmup else ", ".join(f"{n} {s[-1]:.3f} s" for n, s in seconds.items())
        print(f"step {i + 1}/{num_steps}: {done}", flush=True)
    return seconds, cuda_peak, losses


def memory_in_subprocess(script: str, name: str, model_path: str, args, forwarded: tuple[str, ...]) -> dict:
    """Runs `script --measure-memory=name` in a fresh process (CPU peak memory: see the cost scripts' docstrings),
    forwarding the `forwarded` options of `args` and its `bf16` / `activation_checkpointing` flags; returns the JSON
    record it prints last."""
    options = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k in forwarded and v is not None]
    flags = ("bf16", "activation_checkpointing", "tie_word_embeddings")
    flags = [f"--{flag.replace('_', '-')}" for flag in flags if getattr(args, flag, False)]
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


def memory_not_measured(names) -> dict:
    """The memory record of each trainer when the CPU readings are skipped (`--no-cpu-memory`): no figures."""
    return {name: {"peak_increase_bytes": None, "baseline_bytes": None, "new_peak": None} for name in names}


def cost_plot_title(args) -> str:
    """The machine and the sizes a cost plot's figures came from."""
    device = (
        torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else f"CPU, {os.cpu_count()} cores"
    )
    shape = f"{args.preset}: " if getattr(args, "preset", None) else ""
    return (
        f"{device}: {shape}{args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, sequence {args.seq_len}, "
        f"batch {args.batch_size}, {args.steps} timed steps" + (", bf16" if args.bf16 else "")
    )


def _mib(num_bytes: int | None) -> float | None:
    return None if num_bytes is None else num_bytes / 2**20


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
    mib = [_mib(memory[name]["peak_increase_bytes"]) for name in names]
    runs = [[_mib(b) for b in memory[name].get("peak_increase_bytes_runs", [memory[name]["peak_increase_bytes"]])]
            for name in names]  # fmt: skip
    below = [0 if m is None else m - min(r) for m, r in zip(mib, runs)]
    above = [0 if m is None else max(r) - m for m, r in zip(mib, runs)]
    if any(m is None for m in mib):  # `--no-cpu-memory`
        memory_ax.text(0.5, 0.5, "memory not measured", ha="center", va="center", transform=memory_ax.transAxes)
        memory_ax.set_xticks(range(len(ticks)), ticks)
        memory_ax.set_xlim(-0.5, len(ticks) - 0.5)
    else:
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
COST_OPTIONS += ("memory_steps", "device", "seed", "kv_heads", "head_dim", "intermediate")

# Real models' shapes for `--preset`: randomly initialised Llamas of those sizes (not the models' own classes, whose
# tokenizer mappings would go around the offline kit's tokenizer; see `build_tiny_model`). Options given on the
# command line win over a preset's.
PRESETS = {
    # Qwen3-0.6B's configuration (its q/k norms aside), at a 2,048-token sequence with a quarter of it prompt
    "qwen3-0.6b": dict(
        vocab=151936,
        hidden=1024,
        layers=28,
        heads=16,
        kv_heads=8,
        head_dim=128,
        intermediate=3072,
        tie_word_embeddings=True,
        seq_len=2048,
        prompt_len=512,
    ),
}


def add_cost_arguments(parser, steps: int, trainers: str) -> None:
    """The model sizes, batch, steps and precision options of the cost scripts (defaults: the issue's sizes)."""
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, help="key-value heads (default: --heads)")
    parser.add_argument("--head-dim", type=int, help="per-head size (default: hidden / heads)")
    parser.add_argument("--intermediate", type=int, help="MLP size (default: 2 x hidden, as the offline kit's)")
    parser.add_argument("--tie-word-embeddings", action="store_true", help="the LM head shares the embeddings")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a real model's shape; explicit options win")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per row; the rest is completion")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=steps, help="timed steps per trainer")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per trainer before them")
    parser.add_argument("--memory-steps", type=int, default=2, help="full-size steps in each CPU memory subprocess")
    parser.add_argument(
        "--memory-repeats", type=int, default=3, help="CPU memory subprocesses per trainer; the median is reported"
    )
    parser.add_argument(
        "--no-cpu-memory", action="store_true", help="on CPU, skip the memory subprocesses (no memory figures)"
    )
    parser.add_argument("--bf16", action="store_true", help=f"bf16 mixed precision for {trainers}")
    parser.add_argument("--activation-checkpointing", action="store_true", help=f"for {trainers} (default off)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="vocab 4000, hidden 64, 2 layers, seq 128, batch 4")
    parser.add_argument("--model-path", help=argparse.SUPPRESS)  # set in the memory subprocess


def parse_cost_arguments(parser, argv=None):
    """`parser.parse_args`, with `--preset`'s sizes as the defaults that explicit options override."""
    known, _ = parser.parse_known_args(argv)
    if known.preset and known.quick:
        parser.error("--preset and --quick set the sizes both: give one")
    if known.preset:
        parser.set_defaults(**PRESETS[known.preset])
    return parser.parse_args(argv)


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
    if memory[next(iter(timing))]["peak_increase_bytes"] is None:
        memory_method = "not measured (--no-cpu-memory)"
    tokens_per_step = args.batch_size * args.seq_len
    results = {
        name: {
            **{key: timing[name][key] for key in ("median_s", "iqr_s", "q1_s", "q3_s")},
            "step_seconds": timing[name]["seconds"],
            "peak_increase_mib": _mib(memory[name]["peak_increase_bytes"]),
            "peak_increase_mib_runs": [b / 2**20 for b in memory[name].get("peak_increase_bytes_runs", [])],
            "memory_baseline_mib": _mib(memory[name]["baseline_bytes"]),  # RSS on CPU, allocated on CUDA
            "new_peak": memory[name]["new_peak"],
            # The whole process: every trainer's state on CUDA (`max_memory_allocated`), the trainer's own process's
            # peak RSS on CPU
            "peak_mib": _mib(memory[name].get("peak_bytes", _sum_or_none(memory[name], "baseline_bytes"))),
            "tokens_per_step": tokens_per_step,
            "tokens_per_second": tokens_per_step / timing[name]["median_s"],
        }
        for name in timing
    }
    config = {**COST_OPTIMIZER, "bf16": args.bf16, "activation_checkpointing": args.activation_checkpointing}
    tokens = "tokens_per_step: the batch's training rows, batch_size x seq_len (every row is seq_len tokens); "
    tokens += "tokens_per_second: tokens_per_step / median step seconds"
    return {"config": config, "memory_method": memory_method, "tokens_method": tokens, "results": results}


def _sum_or_none(record: dict, baseline_key: str) -> int | None:
    """Baseline plus peak increase: the absolute peak of a reading that only kept those two."""
    if record[baseline_key] is None or record["peak_increase_bytes"] is None:
        return None
    return record[baseline_key] + record["peak_increase_bytes"]


def cost_sizes(args) -> dict:
    """The model, sequence, batch and step sizes a cost record quotes."""
    sizes = {k: getattr(args, k) for k in ("vocab", "hidden", "layers", "heads", "seq_len", "prompt_len")}
    sizes.update(batch_size=args.batch_size, steps=args.steps, warmup=args.warmup)
    if _custom_shape(args):
        sizes.update(
            kv_heads=args.kv_heads or args.heads,
            head_dim=args.head_dim or args.hidden // args.heads,
            intermediate=args.intermediate or 2 * args.hidden,
            tie_word_embeddings=args.tie_word_embeddings,
            preset=args.preset,
        )
    return sizes


def _custom_shape(args) -> bool:
    """Whether the model differs from the offline kit's `build_tiny_model` at `args`' sizes (the scripts that take
    no shape options never do)."""
    extras = [getattr(args, name, None) for name in ("kv_heads", "head_dim", "intermediate")]
    return any(x is not None for x in extras) or getattr(args, "tie_word_embeddings", False)


KIT_MAX_POSITIONS = 1024  # `build_tiny_model`'s max_position_embeddings


def build_cost_model(root: str, args) -> str:
    """The offline kit's randomly initialised Llama at the sizes of `args`, saved under `root`; returns its path.

    With the shape options (`--kv-heads`, `--head-dim`, `--intermediate`, `--tie-word-embeddings`), the kit saves its
    tokenizer and a small model, and a Llama of the full shape (with room for `--seq-len` positions), initialised on
    `args.device` (fast on a GPU), is saved over that model."""
    from trl_offline.offline_kit import build_tiny_model

    path = os.path.join(root, "model")
    if not _custom_shape(args):
        return build_tiny_model(
            path,
            architecture="llama",
            hidden_size=args.hidden,
            num_layers=args.layers,
            num_heads=args.heads,
            vocab_size=args.vocab,
            seed=args.seed,
        )
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

    build_tiny_model(path, num_layers=1, vocab_size=args.vocab, tie_word_embeddings=args.tie_word_embeddings)
    kit = AutoConfig.from_pretrained(path)
    config = LlamaConfig(
        vocab_size=kit.vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or 2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads or args.heads,
        head_dim=args.head_dim or args.hidden // args.heads,
        max_position_embeddings=max(KIT_MAX_POSITIONS, args.seq_len),
        tie_word_embeddings=args.tie_word_embeddings,
        bos_token_id=kit.bos_token_id,
        eos_token_id=kit.eos_token_id,
        pad_token_id=kit.pad_token_id,
    )
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = LlamaForCausalLM(config)
    model.save_pretrained(path)  # fp32, as the kit's: the trainers' bf16 is mixed precision over fp32 weights
    del model
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return path
