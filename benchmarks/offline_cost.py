"""Per-step wall time and peak memory of the trainers that learn from scored responses against the TRL trainer each
replaces, on the same token rows: `ALoLTrainer` vs `SFTTrainer`, and `DROTrainer` (each value network) vs
`KTOTrainer`. A-LoL's one-off precompute (value-head fit and reference passes) is timed separately.

The model is the offline kit's randomly initialised Llama (defaults: 4 layers, hidden 256, vocabulary 32000,
sequence 512, so the LM head dominates). The rows are random token ids: a prompt of `--prompt-len` tokens and a
completion of the rest. Every trainer is built as a user builds it (its default config, plus the shared settings
below), then gets, at step `i`, batch `i` of those rows collated by its **own** data collator, with the columns its
training step reads: SFT `input_ids` + `completion_mask`; KTO `prompt_ids`, `completion_ids`, `label` and its
mismatched `KL_completion_ids` (KTO's default loss estimates its KL term from them, and its reference runs on every
step since `precompute_ref_log_probs=False` by default); A-LoL its precomputed `ref_logp`, `value` and `advantage`
(1.0, so every row has a gradient); DRO its precomputed `ref_logp` and a standardised `reward`. The precomputed
values do not change the cost of a step, so they are constants here.

One "step", the timing (trainers alternate, one step each, warm-up dropped, median and IQR) and the memory (CPU: a
fresh subprocess per trainer, the rise of peak RSS over the RSS after a tiny first step that creates the AdamW
state; CUDA: `max_memory_allocated` over `memory_allocated` before the step) are as in `iqlearn_cost.py`, whose
docstring says exactly what they include. A-LoL's precompute: the wall time of building `ALoLTrainer` on
`--precompute-rows` rows minus building `SFTTrainer` on them, in the same process.

Targets (the issue's): A-LoL at most 1.15x SFT's step time; DRO no slower than KTO, and no more peak memory than KTO
plus its value network's own weights, gradients and AdamW state (16 bytes per trainable fp32 parameter); with
`policy_head`, no more than KTO.

    python benchmarks/offline_cost.py            # the issue's sizes; writes results/offline_cost.json
    python benchmarks/offline_cost.py --quick    # small sizes, about a minute, a smoke run (writes no JSON)

Not run by default: `--trainers ... kto_lora dro_adapter` adds DRO's third value network, `adapter` (a second LoRA
adapter on the policy's frozen base), against `KTOTrainer` with the same LoRA (`_lora_config`: rank 16 on every
projection); the two compare as `dro` does with `kto`, the value state being the value adapter's and head's.
`--preset`, `--no-cpu-memory` and the tokens per second and absolute peaks are as in `iqlearn_cost.py`; the
precompute also gives rows per second.
"""

import argparse
import gc
import json
import os
import tempfile
import time
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
    summary,
    sync,
    time_steps,
    tiny_batch,
    train_step,
    write_json,
)


MIB = 2**20
TRAINERS = ("sft", "alol", "kto", "dro", "dro_policy_head")
PEFT_TRAINERS = ("kto_lora", "dro_adapter")  # on request: the LoRA pair
LABELS = {
    "sft": "SFTTrainer",
    "alol": "ALoLTrainer",
    "kto": "KTOTrainer",
    "dro": "DROTrainer (separate value)",
    "dro_policy_head": "DROTrainer (policy_head)",
    "kto_lora": "KTOTrainer (LoRA)",
    "dro_adapter": "DROTrainer (adapter, LoRA)",
}
# The data format each trainer reads, the DRO variants' value networks, and each DRO variant's KTO counterpart
FORMATS = {"sft": "sft", "alol": "alol", "kto": "kto", "kto_lora": "kto", "dro": "dro", "dro_policy_head": "dro"}
FORMATS["dro_adapter"] = "dro"
VALUE_NETWORKS = {"dro_policy_head": "policy_head", "dro_adapter": "adapter"}
KTO_OF = {"dro": "kto", "dro_policy_head": "kto", "dro_adapter": "kto_lora"}


def _lora_config():
    """Rank 16 on every projection of the attention and the MLP (not the LM head, which DRO refuses)."""
    from peft import LoraConfig

    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=modules, task_type="CAUSAL_LM")


BYTES_PER_TRAINED_PARAMETER = 16  # fp32 weight, gradient and two AdamW moments


def _rows(args) -> list[dict]:
    """Random token rows, the same for every trainer."""
    num_rows = args.batch_size * (args.warmup + args.steps)
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(4, args.vocab, (num_rows, args.seq_len), generator=gen).tolist()  # (rows, seq_len)
    return [{"prompt_ids": row[: args.prompt_len], "completion_ids": row[args.prompt_len :]} for row in ids]


def _examples(name: str, rows: list[dict]) -> list[dict]:
    """`rows` (one batch) in the columns trainer `name` collates."""
    name = FORMATS[name]
    completion_len = len(rows[0]["completion_ids"])
    if name == "sft":
        return [
            {"input_ids": r["prompt_ids"] + r["completion_ids"], "completion_mask": [0] * len(r["prompt_ids"])
             + [1] * completion_len}
            for r in rows
        ]  # fmt: skip
    if name == "kto":  # KTO's KL completions: the batch's completions rotated by one
        rotated = [rows[-1]["completion_ids"]] + [r["completion_ids"] for r in rows[:-1]]
        return [{**r, "label": i % 2 == 0, "KL_completion_ids": kl} for i, (r, kl) in enumerate(zip(rows, rotated))]
    if name == "alol":
        return [{**r, "reward": 1.0, "ref_logp": -8.0 * completion_len, "value": 0.0, "advantage": 1.0} for r in rows]
    return [
        {**r, "reward": 1.0 if i % 2 == 0 else -1.0, "ref_logp": -8.0 * completion_len} for i, r in enumerate(rows)
    ]


def _config_kwargs(name: str, args, output_dir: str) -> dict:
    common = dict(
        output_dir=os.path.join(output_dir, name),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        max_steps=args.warmup + args.steps,
        **COST_OPTIMIZER,
        max_length=None,
        use_cpu=args.device == "cpu",
        bf16=args.bf16,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=args.seed,
        gradient_checkpointing=args.activation_checkpointing,
    )
    if name in VALUE_NETWORKS:
        common["value_network"] = VALUE_NETWORKS[name]
    return common


def _trainer(name: str, args, model_path: str, rows: list[dict], output_dir: str):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer, SFTConfig, SFTTrainer

    from trl_offline import ALoLConfig, ALoLTrainer, DROConfig, DROTrainer

    kwargs = _config_kwargs(name, args, output_dir)
    peft = {"peft_config": _lora_config()} if name in PEFT_TRAINERS else {}
    small = rows[: 2 * args.batch_size]
    if name == "sft":
        dataset = Dataset.from_list(_examples("sft", small))
        trainer = SFTTrainer(model_path, args=SFTConfig(**kwargs, completion_only_loss=True), train_dataset=dataset)
    elif FORMATS[name] == "kto":
        # KTO tokenizes text: its dataset only has to build the trainer; the timed batches are collated from `rows`
        text = Dataset.from_list([{"prompt": "ab=", "completion": "ab", "label": i % 2 == 0} for i in range(4)])
        trainer = KTOTrainer(model_path, args=KTOConfig(**kwargs), train_dataset=text, **peft)
    else:
        dataset = Dataset.from_list([{**r, "reward": float(i % 2)} for i, r in enumerate(small)])
        if name == "alol":
            config = ALoLConfig(**kwargs, value_num_prompts=len(small), value_num_epochs=1)
            trainer = ALoLTrainer(model_path, args=config, train_dataset=dataset)
        else:
            trainer = DROTrainer(model_path, args=DROConfig(**kwargs), train_dataset=dataset, **peft)
    trainer.create_optimizer_and_scheduler(num_training_steps=trainer.args.max_steps)
    trainer.model_wrapped, trainer.optimizer = trainer.accelerator.prepare(trainer.model, trainer.optimizer)
    trainer.current_gradient_accumulation_steps = 1  # what `train()` sets before its first step
    return trainer


def _batches(name: str, trainer, args, rows: list[dict]) -> list[dict]:
    size = args.batch_size
    return [trainer.data_collator(_examples(name, rows[i : i + size])) for i in range(0, len(rows), size)]


def _value_state_bytes(trainer) -> int:
    """What DRO's value network adds by its own trainable parameters: weights, gradients and AdamW moments."""
    return BYTES_PER_TRAINED_PARAMETER * sum(p.numel() for p in trainer.value_parameters() if p.requires_grad)


def measure_memory(args):
    """Runs in the child process (CPU): prints one JSON line with the peak RSS increase of full-size steps."""
    name = args.measure_memory
    rows = _rows(args)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = _trainer(name, args, args.model_path, rows, output_dir)
        batches = _batches(name, trainer, args, rows)
        train_step(trainer, tiny_batch(batches[0], args.prompt_len + 16))  # AdamW state, kernels, thread pools
        gc.collect()
        peak_before, baseline = peak_rss_bytes(), current_rss_bytes()
        for batch in batches[: args.memory_steps]:
            train_step(trainer, batch)
        sync(trainer.args.device)
        peak = peak_rss_bytes()
        value_bytes = _value_state_bytes(trainer) if name.startswith("dro") else 0
    record = {
        "peak_increase_bytes": peak - baseline,
        "baseline_bytes": baseline,
        "new_peak": peak > peak_before,
        "value_state_bytes": value_bytes,
    }
    print(json.dumps(record))


_FORWARDED = COST_OPTIONS


def _precompute_seconds(args, model_path: str, root: str) -> dict:
    """Building `ALoLTrainer` (value fit and reference passes) on `--precompute-rows` rows, and `SFTTrainer`."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from trl_offline import ALoLConfig, ALoLTrainer

    gen = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(4, args.vocab, (args.precompute_rows, args.seq_len), generator=gen).tolist()
    rows = [{"prompt_ids": r[: args.prompt_len], "completion_ids": r[args.prompt_len :]} for r in ids]
    seconds = {}
    tic = time.perf_counter()
    sft_rows = Dataset.from_list(_examples("sft", rows))
    SFTTrainer(model_path, args=SFTConfig(**_config_kwargs("sft", args, root), completion_only_loss=True),
               train_dataset=sft_rows)  # fmt: skip
    seconds["sft"] = time.perf_counter() - tic
    tic = time.perf_counter()
    scored = Dataset.from_list([{**r, "reward": float(i % 2)} for i, r in enumerate(rows)])
    config = ALoLConfig(**_config_kwargs("alol", args, root), value_num_prompts=args.precompute_rows)
    ALoLTrainer(model_path, args=config, train_dataset=scored)
    seconds["alol"] = time.perf_counter() - tic
    extra = seconds["alol"] - seconds["sft"]
    return {
        "rows": args.precompute_rows,
        "seconds": seconds,
        "extra_seconds": extra,
        "extra_seconds_per_row": extra / args.precompute_rows,
        "rows_per_second": args.precompute_rows / extra if extra > 0 else None,
    }


def run(args):
    start = time.perf_counter()
    device = torch.device(args.device)
    names = list(args.trainers)
    with tempfile.TemporaryDirectory() as root:
        model_path = build_cost_model(root, args)
        if device.type != "cuda" and args.no_cpu_memory:
            memory = memory_not_measured(names)
        elif device.type != "cuda":
            # Before this process grows: Linux carries the parent's peak RSS into a child's `ru_maxrss`
            memory = memory_in_subprocesses(__file__, names, model_path, args, _FORWARDED)
        precompute = _precompute_seconds(args, model_path, root) if "alol" in names else None
        gc.collect()  # the precompute's two trainers, before the timed ones take their memory
        rows = _rows(args)
        trainers = {name: _trainer(name, args, model_path, rows, root) for name in names}
        batches = {name: _batches(name, trainers[name], args, rows) for name in names}
        value_bytes = {name: _value_state_bytes(t) if name.startswith("dro") else 0 for name, t in trainers.items()}

        seconds, cuda_peak, _ = time_steps(trainers, batches, args.warmup, device)
        del trainers
        gc.collect()
        if device.type == "cuda":
            memory = cuda_peak
        memory = {name: {**memory[name], "value_state_bytes": value_bytes[name]} for name in names}

    timing = {name: summary(s) for name, s in seconds.items()}
    measured = memory[names[0]]["peak_increase_bytes"] is not None
    mib = {name: memory[name]["peak_increase_bytes"] / MIB if measured else None for name in names}
    ratios, targets = {}, {}
    if {"sft", "alol"} <= set(names):
        ratios["alol_vs_sft_step_time"] = timing["alol"]["median_s"] / timing["sft"]["median_s"]
        ratios["alol_vs_sft_peak_memory"] = mib["alol"] / max(mib["sft"], 1e-9) if measured else None
        targets["alol_vs_sft_step_time"] = {"at_most": 1.15}
    for dro, kto in KTO_OF.items():
        if {kto, dro} <= set(names):
            # The LoRA pair's keys name their counterpart: `dro_adapter_vs_kto_lora_...`
            ratios[f"{dro}_vs_{kto}_step_time"] = timing[dro]["median_s"] / timing[kto]["median_s"]
            ratios[f"{dro}_vs_{kto}_peak_memory"] = mib[dro] / max(mib[kto], 1e-9) if measured else None
            allowance = 0.0 if dro == "dro_policy_head" else memory[dro]["value_state_bytes"] / MIB
            ratios[f"{dro}_vs_{kto}_plus_value_state_peak_memory"] = (
                mib[dro] / max(mib[kto] + allowance, 1e-9) if measured else None
            )
            targets[f"{dro}_vs_{kto}_step_time"] = {"at_most": 1.0}
            targets[f"{dro}_vs_{kto}_plus_value_state_peak_memory"] = {"at_most": 1.0}
    for key, target in targets.items():
        target["met"] = None if ratios[key] is None else ratios[key] <= target["at_most"]

    sizes = cost_sizes(args)
    print(f"\n{sizes}")
    print(f"{'trainer':<30}{'median s':>10}{'IQR s':>9}{'peak +MiB':>11}{'value state MiB':>17}")
    for name in names:
        t = timing[name]
        value_mib = memory[name]["value_state_bytes"] / MIB
        peak = "-" if mib[name] is None else f"{mib[name]:.1f}"
        print(f"{LABELS[name]:<30}{t['median_s']:>10.3f}{t['iqr_s']:>9.3f}{peak:>11}{value_mib:>17.1f}")
    for key, ratio in ratios.items():
        if ratio is None:
            print(f"{key}: not measured")
            continue
        verdict = (
            ""
            if key not in targets
            else f" (target <= {targets[key]['at_most']:.2f}x: " + ("met)" if targets[key]["met"] else "MISSED)")
        )
        print(f"{key}: {ratio:.3f}x{verdict}")
    if precompute:
        print(
            f"A-LoL precompute on {precompute['rows']} rows: {precompute['extra_seconds']:.1f} s more than building "
            f"SFTTrainer ({1000 * precompute['extra_seconds_per_row']:.1f} ms per row)"
        )

    shared = cost_record_fields(args, device, timing, memory)
    for name in names:
        shared["results"][name]["value_state_mib"] = memory[name]["value_state_bytes"] / MIB
    record = {
        "benchmark": "per-step wall time and peak memory: ALoLTrainer vs SFTTrainer, DROTrainer vs KTOTrainer",
        **provenance(args.device),
        "sizes": sizes,
        "step": "get_batch_samples + training_step (forward(s), loss, metrics, backward) + clip_grad_norm + "
        "optimizer.step + lr_scheduler.step + zero_grad",
        "timing_method": "one process, trainers take turns one step each (rotating order), warm-up steps dropped",
        **shared,
        "ratios": ratios,
        "targets": targets,
        "alol_precompute": precompute,
        "wall_seconds": time.perf_counter() - start,
    }
    if args.output:
        write_json(args.output, record)
        plot_cost(timing, memory, LABELS, str(Path(args.output).with_suffix(".png")), cost_plot_title(args))
    print(f"total {record['wall_seconds']:.0f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cost_arguments(parser, steps=6, trainers="every trainer")
    parser.add_argument("--trainers", nargs="+", choices=TRAINERS + PEFT_TRAINERS, default=list(TRAINERS))
    parser.add_argument("--precompute-rows", type=int, default=256, help="rows of the A-LoL precompute timing")
    parser.add_argument("--output", help="JSON to write (default: results/offline_cost.json; none with --quick)")
    parser.add_argument("--measure-memory", choices=TRAINERS + PEFT_TRAINERS, help=argparse.SUPPRESS)  # subprocess
    args = parse_cost_arguments(parser)
    if args.quick:
        apply_quick_sizes(args)
        args.steps, args.precompute_rows = 4, 32
    finish_cost_arguments(parser, args, "offline_cost.json")
    if args.measure_memory:
        return measure_memory(args)
    run(args)


if __name__ == "__main__":
    main()
