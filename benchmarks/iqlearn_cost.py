"""Per-step wall time and peak memory of `IQLearnTrainer` vs TRL's `SFTTrainer`, on the same batches.

The model is a randomly initialised Llama from the offline kit whose LM head dominates (defaults: 4 layers, hidden
256, vocabulary 32000, sequence 512). The data are fixed-length pre-tokenized rows of random token ids: a prompt of
`--prompt-len` tokens and a completion of the rest, given to both trainers as `input_ids` + `completion_mask` with
`completion_only_loss=True`, so `SFTTrainer._prepare_dataset` turns them into `labels` (-100 on the prompt) for both.
Both trainers get identical configs (same optimizer, learning rate, batch size, seed; no shuffling, a sequential
sampler); the script takes the collated batches from each trainer's own dataloader, checks that they are identical,
and feeds batch `i` to both at step `i`.

What one "step" is: exactly what `Trainer`'s training loop does per optimizer step with no gradient accumulation,
minus callbacks and logging: `trainer.get_batch_samples` (counts `num_items_in_batch`), `trainer.training_step`
(input preparation, `compute_loss` = the model forward with the trainer's head (TRL's fused LM head for SFT, the
soft-Q head for IQLearn), the loss, the per-step metric reductions, then the backward), gradient clipping to
`max_grad_norm`, `optimizer.step()`, `lr_scheduler.step()` and `model.zero_grad()`. The optimizer and scheduler come
from `trainer.create_optimizer_and_scheduler` and are wrapped by `trainer.accelerator.prepare`, as in `train()`.

Step time: both trainers live in one process and take turns, one step each, alternating which goes first, so machine
noise hits both equally. The first `--warmup` steps are dropped; the table gives the median and interquartile range
(IQR) of the rest, and the ratio of the medians.

Peak memory (the "peak increase"): what one step needs on top of the state that persists between steps (the model,
the AdamW state, the batch). Counting the AdamW state, created by the first step, would add the same amount to both
trainers and flatter the ratio, so it is created first. On CUDA the number is `torch.cuda.max_memory_allocated()`
minus `torch.cuda.memory_allocated()` just before the step, taken around the timed steps in the same process (the
maximum over them). On CPU there is no allocator counter, so, as in `benchmarks/ops_memory.py`, each trainer runs in
a fresh subprocess of this script (hidden `--measure-memory`): it builds the trainer, optimizer and batch, runs one
step on a tiny slice of the batch (1 row, `--prompt-len + 16` tokens; it creates the AdamW state and loads kernels
while setting a small RSS peak), then reports the increase of the peak resident set size (`ru_maxrss`) over the
resident set size before `--memory-steps` full-size steps on the same batches as the timing run. The subprocesses run
before the timing loop: Linux carries a parent's peak RSS into its child's `ru_maxrss` across `exec`, so a child
started from the grown parent would see no new peak. A child that still sets none says so (`new_peak: false`). The
ratio uses these increases, which is stricter than a ratio of whole-process totals (those would add the runtime, the
model and the AdamW state to both sides).

`--profile` adds one step of each trainer under `torch.profiler` after the timing and prints the costliest operators.

    python benchmarks/iqlearn_cost.py            # defaults: the issue's configuration, writes results/iqlearn_cost.json
    python benchmarks/iqlearn_cost.py --quick    # small sizes, well under a minute, a smoke run (writes no JSON)
    python benchmarks/iqlearn_cost.py --preset qwen3-0.6b --device cuda --bf16   # a real model's shape, on a GPU

`--preset` gives a real model's shape (see `common.PRESETS`), `--no-cpu-memory` skips the CPU memory subprocesses,
and each record also gives each trainer's tokens per second and absolute peak (`peak_mib`).
"""

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from common import (
    COST_OPTIMIZER,
    COST_OPTIONS,
    add_cost_arguments,
    apply_quick_sizes,
    build_cost_model,
    cost_plot_title,
    cost_record_fields,
    cost_sizes,
    current_rss_bytes,
    finish_cost_arguments,
    memory_in_subprocesses,
    memory_not_measured,
    parse_cost_arguments,
    peak_rss_bytes,
    plot_cost,
    provenance,
    same_batches,
    summary,
    sync,
    time_steps,
    tiny_batch,
    train_step,
    write_json,
)


MIB = 2**20
TRAINERS = ("sft", "iqlearn")
LABELS = {"sft": "SFTTrainer", "iqlearn": "IQLearnTrainer"}
TARGETS = {"step_time": 1.10, "peak_memory": 1.05}  # IQLearn / SFT, at most


def _dataset(args):
    """Fixed-length rows of random token ids: `prompt_len` prompt tokens, then `seq_len - prompt_len` completion."""
    from datasets import Dataset

    num_rows = args.batch_size * (args.warmup + args.steps)
    gen = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(0, args.vocab, (num_rows, args.seq_len), generator=gen)  # (rows, seq_len)
    completion_mask = torch.ones_like(input_ids)
    completion_mask[:, : args.prompt_len] = 0
    return Dataset.from_dict({"input_ids": input_ids.tolist(), "completion_mask": completion_mask.tolist()})


def _trainer(name, args, model_path, dataset, output_dir):
    from trl import SFTConfig, SFTTrainer

    from trl_offline import IQLearnConfig, IQLearnTrainer

    common = dict(
        output_dir=os.path.join(output_dir, name),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        max_steps=args.warmup + args.steps,
        **COST_OPTIMIZER,
        max_length=None,  # every row is seq_len tokens: no truncation
        completion_only_loss=True,
        shuffle_dataset=False,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        use_cpu=args.device == "cpu",
        bf16=args.bf16,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=args.seed,
        # SFTConfig turns it on by default; `gradient_checkpointing` is its deprecated alias
        activation_checkpointing=args.activation_checkpointing,
    )
    if name == "sft":
        config, cls = SFTConfig(**common), SFTTrainer
    else:
        config = IQLearnConfig(**common, td_coef=args.td_coef, logits_chunk_size=args.logits_chunk_size)
        cls = IQLearnTrainer
    trainer = cls(model=model_path, args=config, train_dataset=dataset)
    trainer.create_optimizer_and_scheduler(num_training_steps=config.max_steps)
    trainer.model_wrapped, trainer.optimizer = trainer.accelerator.prepare(trainer.model, trainer.optimizer)
    return trainer


def _batches(trainer):
    return list(trainer.get_train_dataloader())


def measure_memory(args):
    """Runs in the child process (CPU): prints one JSON line with the peak RSS increase of full-size steps."""
    dataset = _dataset(args)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = _trainer(args.measure_memory, args, args.model_path, dataset, output_dir)
        batches = _batches(trainer)
        device = trainer.args.device
        train_step(trainer, tiny_batch(batches[0], args.prompt_len + 16))  # AdamW state, kernels, thread pools
        gc.collect()
        peak_before, baseline = peak_rss_bytes(), current_rss_bytes()
        for batch in batches[: args.memory_steps]:
            train_step(trainer, batch)
        sync(device)
        peak = peak_rss_bytes()
    new_peak = peak > peak_before
    if not new_peak:
        print(f"warning: {args.measure_memory} set no new RSS peak; its number is an upper bound", file=sys.stderr)
    record = {"peak_increase_bytes": peak - baseline, "baseline_bytes": baseline, "new_peak": new_peak}
    print(json.dumps(record))


_FORWARDED = (*COST_OPTIONS, "td_coef", "logits_chunk_size")


def _profile(name, trainer, batch):
    """One more step under `torch.profiler`: prints the operators that took the most time (after the timed steps)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        train_step(trainer, batch)
    sort_by = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(f"\n{LABELS[name]}: one step under torch.profiler")
    print(prof.key_averages().table(sort_by=sort_by, row_limit=15, max_name_column_width=48))


def run(args):
    start = time.perf_counter()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as root:
        model_path = build_cost_model(root, args)
        if device.type != "cuda" and args.no_cpu_memory:
            memory = memory_not_measured(TRAINERS)
        elif device.type != "cuda":
            # Before this process grows: Linux carries the parent's peak RSS into a child's `ru_maxrss`
            memory = memory_in_subprocesses(__file__, TRAINERS, model_path, args, _FORWARDED)
        dataset = _dataset(args)
        trainers = {name: _trainer(name, args, model_path, dataset, root) for name in TRAINERS}
        batches = {name: _batches(trainer) for name, trainer in trainers.items()}
        if not same_batches(batches["sft"], batches["iqlearn"]):
            raise RuntimeError("The two trainers collated different batches.")
        batches = batches["sft"]
        if len(batches) != args.warmup + args.steps:
            raise RuntimeError(f"Expected {args.warmup + args.steps} batches, got {len(batches)}.")

        seconds, cuda_peak, losses = time_steps(trainers, dict.fromkeys(TRAINERS, batches), args.warmup, device)
        # Same weights and batch at the first step, so IQLearn's NLL term is SFT's loss
        first_nll = trainers["iqlearn"]._metrics["train"]["nll"][0]
        if args.profile:
            for name in TRAINERS:
                _profile(name, trainers[name], batches[-1])
        del trainers
        gc.collect()

        if device.type == "cuda":
            memory = cuda_peak

    timing = {name: summary(s) for name, s in seconds.items()}
    time_ratio = timing["iqlearn"]["median_s"] / timing["sft"]["median_s"]
    measured = memory["sft"]["peak_increase_bytes"] is not None
    mem_ratio = (
        memory["iqlearn"]["peak_increase_bytes"] / max(memory["sft"]["peak_increase_bytes"], 1) if measured else None
    )
    nll_matches = abs(first_nll - losses["sft"][0]) <= 1e-4 * max(1.0, abs(losses["sft"][0]))
    if not nll_matches:
        warnings.warn(f"First-step NLL differs: IQLearn {first_nll} vs SFT {losses['sft'][0]}", stacklevel=1)
    for name in TRAINERS:
        if memory[name]["new_peak"] is False:
            warnings.warn(f"{name}: no new RSS peak, so its memory number is an upper bound", stacklevel=1)

    sizes = cost_sizes(args)
    print(f"\n{sizes}")
    print(f"{'trainer':<16}{'median s':>10}{'IQR s':>9}{'peak +MiB':>11}")
    for name in TRAINERS:
        t, m = timing[name], memory[name]["peak_increase_bytes"]
        m = "-" if m is None else f"{m / MIB:.1f}"
        print(f"{LABELS[name]:<16}{t['median_s']:>10.3f}{t['iqr_s']:>9.3f}{m:>11}")
    met = {
        "step_time": time_ratio <= TARGETS["step_time"],
        "peak_memory": None if mem_ratio is None else mem_ratio <= TARGETS["peak_memory"],
    }
    for key, ratio in (("step_time", time_ratio), ("peak_memory", mem_ratio)):
        if ratio is None:
            print(f"IQLearn / SFT {key.replace('_', ' ')}: not measured")
            continue
        verdict = "met" if met[key] else "MISSED"
        print(f"IQLearn / SFT {key.replace('_', ' ')}: {ratio:.3f}x (target <= {TARGETS[key]:.2f}x: {verdict})")

    shared = cost_record_fields(args, device, timing, memory)
    shared["config"].update(td_coef=args.td_coef, logits_chunk_size=args.logits_chunk_size)
    for name in TRAINERS:
        shared["results"][name]["first_step_loss"] = losses[name][0]
    record = {
        "benchmark": "per-step wall time and peak memory: IQLearnTrainer vs SFTTrainer, same batches",
        **provenance(args.device),
        "sizes": sizes,
        "step": "get_batch_samples + training_step (forward, loss, metrics, backward) + clip_grad_norm + "
        "optimizer.step + lr_scheduler.step + zero_grad",
        "timing_method": "one process, trainers alternate one step each (alternating order), warm-up steps dropped",
        **shared,
        "iqlearn_first_step_nll": first_nll,
        "first_step_nll_matches_sft_loss": nll_matches,
        "ratios": {"step_time_median": time_ratio, "peak_memory_increase": mem_ratio},
        "targets": {key: {"at_most": TARGETS[key], "met": met[key]} for key in TARGETS},
        "wall_seconds": time.perf_counter() - start,
    }
    if args.output:
        write_json(args.output, record)
        plot_cost(timing, memory, LABELS, str(Path(args.output).with_suffix(".png")), cost_plot_title(args))
    print(f"total {record['wall_seconds']:.0f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cost_arguments(parser, steps=10, trainers="both trainers")
    parser.add_argument("--td-coef", type=float, default=0.1)
    parser.add_argument("--logits-chunk-size", type=int, default=1024, help="IQLearnConfig.logits_chunk_size")
    parser.add_argument("--profile", action="store_true", help="after timing, print a profile of one step of each")
    parser.add_argument(
        "--output", help="JSON to write (default: results/iqlearn_cost.json; with --quick, none unless given)"
    )
    parser.add_argument("--measure-memory", choices=TRAINERS, help=argparse.SUPPRESS)  # set in the subprocess
    args = parse_cost_arguments(parser)
    if args.quick:
        apply_quick_sizes(args)
        args.steps = 6
    finish_cost_arguments(parser, args, "iqlearn_cost.json")
    if args.measure_memory:
        return measure_memory(args)
    run(args)


if __name__ == "__main__":
    main()
