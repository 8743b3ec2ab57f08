"""The cost parts of `run.py`: `benchmarks/iqlearn_cost.py` and `benchmarks/offline_cost.py` as subprocesses at a
real model's shape (`--preset qwen3-0.6b`: a Llama with Qwen3-0.6B's sizes, sequences of 2,048), bf16 mixed
precision, every trainer of a script alive in one process and stepping in turn on the same batches, as the scripts
do; and the issue's targets read off their records.

The batches are sized for an 80 GB GPU (so that H100 and H200 figures compare) with every trainer of the script
alive at once, by `estimate.py`: IQLearn + SFT at 8 rows (about 44 GiB), the seven trainers of `offline_cost.py` at
2 rows (about 61 GiB); 4 rows would be about 69 GiB, too close to 80 GB for an estimate. Each part's record keeps
the estimate beside the peak measured.

With `--quick` (CI, on the CPU) the shape is tiny but keeps what the preset exercises (grouped key-value heads, a
head size apart from hidden / heads, tied embeddings), and the CPU memory subprocesses are skipped.
"""

import json
import sys
from pathlib import Path

from estimate import estimate_peak


OFFLINE_TRAINERS = ["sft", "alol", "kto", "dro", "dro_policy_head", "kto_lora", "dro_adapter"]
QUICK_SHAPE = ["--vocab", "4000", "--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2"]
QUICK_SHAPE += ["--head-dim", "32", "--intermediate", "96", "--tie-word-embeddings", "--seq-len", "128"]
QUICK_SHAPE += ["--prompt-len", "32"]
PLANS = {
    "iqlearn_cost": dict(script="benchmarks/iqlearn_cost.py", batch_size=8, extra=[]),
    "offline_cost": dict(
        script="benchmarks/offline_cost.py",
        batch_size=2,
        extra=["--trainers", *OFFLINE_TRAINERS, "--precompute-rows", "128"],
        quick_extra=["--trainers", *OFFLINE_TRAINERS, "--precompute-rows", "8"],
    ),
}
STEPS, WARMUP = 20, 3
QUICK_STEPS, QUICK_WARMUP, QUICK_BATCH = 3, 1, 4

# The issue's targets: (key, result, trainer, its baseline, the figure compared, at most)
TARGETS = [
    ("iqlearn_vs_sft_step_time", "iqlearn_cost", "iqlearn", "sft", "median_s", 1.05),
    ("iqlearn_vs_sft_peak_memory_increase", "iqlearn_cost", "iqlearn", "sft", "peak_increase_mib", 1.02),
    ("alol_vs_sft_step_time", "offline_cost", "alol", "sft", "median_s", 1.10),
    ("dro_separate_vs_kto_step_time", "offline_cost", "dro", "kto", "median_s", 1.00),
    ("dro_policy_head_vs_kto_step_time", "offline_cost", "dro_policy_head", "kto", "median_s", 1.00),
    ("dro_adapter_vs_kto_lora_step_time", "offline_cost", "dro_adapter", "kto_lora", "median_s", 1.00),
]


def command(part: str, *, device: str, quick: bool, out: Path, batch_size: int | None = None) -> list[str]:
    """The cost script's command line for `part`, writing `out/<part>.json` and its PNG."""
    plan = PLANS[part]
    if quick:
        sizes = [*QUICK_SHAPE, "--batch-size", str(batch_size or QUICK_BATCH)]
        sizes += ["--steps", str(QUICK_STEPS), "--warmup", str(QUICK_WARMUP), "--memory-steps", "1"]
        sizes += ["--memory-repeats", "1"]
        extra = plan.get("quick_extra", plan["extra"])
    else:
        sizes = ["--preset", "qwen3-0.6b", "--batch-size", str(batch_size or plan["batch_size"])]
        sizes += ["--steps", str(STEPS), "--warmup", str(WARMUP)]
        extra = plan["extra"]
    memory = ["--no-cpu-memory"] if device == "cpu" else []
    output = ["--output", str(out / f"{part}.json")]
    return [sys.executable, plan["script"], *sizes, "--bf16", "--device", device, *memory, *output, *extra]


def read_result(part: str, out: Path) -> dict:
    """The figures `run.py` quotes from the script's record: per trainer, the median step time, tokens per second
    and the peaks; with the memory estimate for the sizes it ran at."""
    record = json.loads((out / f"{part}.json").read_text())
    figures = ("median_s", "iqr_s", "tokens_per_step", "tokens_per_second", "peak_mib", "peak_increase_mib")
    trainers = {name: {key: result[key] for key in figures} for name, result in record["results"].items()}
    estimate = estimate_peak(record["sizes"], list(trainers))
    peaks = [t["peak_mib"] for t in trainers.values() if t["peak_mib"] is not None]
    return {
        "file": f"{part}.json",
        "sizes": record["sizes"],
        "memory_method": record["memory_method"],
        "trainers": trainers,
        "memory_estimate": estimate,
        # On CUDA, every trainer's state counted: what the estimate predicts
        "measured_peak_gib": max(peaks) / 1024 if peaks and "cuda" in record["memory_method"] else None,
        "script_targets": record["targets"],
    }


def issue_targets(results: dict) -> list[dict]:
    """Each target's ratio, computed from the two figures it quotes; `met` is None where a figure is missing (a part
    that failed, or memory not measured)."""
    rows = []
    for key, part, trainer, baseline, figure, at_most in TARGETS:
        trainers = results.get(part, {}).get("trainers", {})
        value = trainers.get(trainer, {}).get(figure)
        base = trainers.get(baseline, {}).get(figure)
        ratio = value / base if value is not None and base else None
        rows.append(
            {
                "target": key,
                "result": part,
                "figure": figure,
                "trainer": trainer,
                "value": value,
                "baseline": baseline,
                "baseline_value": base,
                "ratio": ratio,
                "at_most": at_most,
                "met": None if ratio is None else ratio <= at_most,
            }
        )
    return rows
