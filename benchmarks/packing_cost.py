"""Tokens per second of `IQLearnTrainer` with `packing=True` against the same rows padded, and against TRL's
`SFTTrainer` packed (and padded), on rows of varied length.

The model is the offline kit's randomly initialised Llama (the cost scripts' sizes, `build_cost_model`). The rows are
random token ids whose lengths are drawn uniformly from `[--min-len, --seq-len]`, a quarter of each row its prompt,
given to every trainer as `input_ids` + `completion_mask` with `completion_only_loss=True`. Packed trainers pack them
with TRL's default best-fit-decreasing strategy into rows of `--seq-len` tokens and collate them padding-free (one row
of all the batch's sequences, `position_ids` restarting at each); padded trainers pad each batch to its longest row.
SFT and IQLearn collate with the same code: the script checks that their packed batches, and their padded batches,
are identical.

A step is what `Trainer`'s loop does per optimizer step (`common.train_step`); the trainers take turns, one step each
in rotating order, on their own batches `i` (packed and padded batches hold different rows, so they are compared per
token, not per step). The first `--warmup` steps are dropped. Tokens per second is the number of real (not padding)
tokens of the timed steps over their seconds; the tokens a trainer scores (completion tokens) are recorded too.

    python benchmarks/packing_cost.py           # writes results/packing_cost.json and .png
    python benchmarks/packing_cost.py --quick   # small sizes, seconds (CI)
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from common import (
    COST_OPTIMIZER,
    build_cost_model,
    provenance,
    same_batches,
    summary,
    time_steps,
    write_json,
)


TRAINERS = ("sft_packed", "iqlearn_packed", "iqlearn_padded", "sft_padded")
LABELS = {
    "sft_packed": "SFTTrainer, packed",
    "iqlearn_packed": "IQLearnTrainer, packed",
    "iqlearn_padded": "IQLearnTrainer, padded",
    "sft_padded": "SFTTrainer, padded",
}


def _dataset(args):
    """Rows of random token ids of lengths uniform in `[min_len, seq_len]`, the first quarter of each its prompt;
    enough of them for the packed trainers' steps."""
    from datasets import Dataset

    gen = torch.Generator().manual_seed(args.seed)
    mean_len = (args.min_len + args.seq_len) / 2
    num_rows = int(1.2 * args.batch_size * (args.warmup + args.steps) * args.seq_len / mean_len) + args.batch_size
    lengths = torch.randint(args.min_len, args.seq_len + 1, (num_rows,), generator=gen).tolist()
    rows = {"input_ids": [], "completion_mask": []}
    for length in lengths:
        prompt_len = length // 4
        rows["input_ids"].append(torch.randint(4, args.vocab, (length,), generator=gen).tolist())
        rows["completion_mask"].append([0] * prompt_len + [1] * (length - prompt_len))
    return Dataset.from_dict(rows)


def _trainer(name: str, args, model_path: str, dataset, output_dir: str):
    from trl import SFTConfig, SFTTrainer

    from trl_offline import IQLearnConfig, IQLearnTrainer

    config = dict(
        output_dir=os.path.join(output_dir, name),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.warmup + args.steps,
        **COST_OPTIMIZER,
        max_length=args.seq_len,
        packing=name.endswith("packed"),
        completion_only_loss=True,
        shuffle_dataset=False,
        train_sampling_strategy="sequential",
        use_cpu=args.device == "cpu",
        bf16=args.bf16,
        activation_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=args.seed,
    )
    if name.startswith("sft"):
        trainer = SFTTrainer(model_path, args=SFTConfig(**config), train_dataset=dataset)
    else:
        trainer = IQLearnTrainer(model_path, args=IQLearnConfig(**config, td_coef=args.td_coef), train_dataset=dataset)
    trainer.create_optimizer_and_scheduler(num_training_steps=trainer.args.max_steps)
    trainer.model_wrapped, trainer.optimizer = trainer.accelerator.prepare(trainer.model, trainer.optimizer)
    trainer.current_gradient_accumulation_steps = 1  # what `train()` sets before its first step
    return trainer


def _batches(trainer, count: int) -> list[dict]:
    batches = []
    for batch in trainer.get_train_dataloader():
        batches.append(batch)
        if len(batches) == count:
            return batches
    raise RuntimeError(f"{type(trainer).__name__}'s dataloader gave {len(batches)} batches, {count} needed.")


def _tokens(batch: dict) -> tuple[int, int]:
    """Real tokens of a batch (padding-free batches hold no padding) and the completion tokens among them."""
    real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    return real, int((batch["labels"] != -100).sum())


def run(args) -> dict:
    start = time.perf_counter()
    device = torch.device(args.device)
    count = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as root:
        model_path = build_cost_model(root, args)
        dataset = _dataset(args)
        trainers = {name: _trainer(name, args, model_path, dataset, root) for name in TRAINERS}
        batches = {name: _batches(trainer, count) for name, trainer in trainers.items()}
        for kind in ("packed", "padded"):
            if not same_batches(batches[f"sft_{kind}"], batches[f"iqlearn_{kind}"]):
                raise RuntimeError(f"SFTTrainer and IQLearnTrainer collated different {kind} batches.")
        if (
            "position_ids" not in batches["iqlearn_packed"][0]
            or batches["iqlearn_packed"][0]["input_ids"].shape[0] != 1
        ):
            raise RuntimeError("The packed batches are not padding-free.")
        seconds, cuda_peak, _ = time_steps(trainers, batches, args.warmup, device)
    results = {}
    for name in TRAINERS:
        timed = batches[name][args.warmup :]
        real, scored = (sum(counts) for counts in zip(*map(_tokens, timed)))
        total = sum(seconds[name])
        results[name] = {
            **summary(seconds[name]),
            "real_tokens": real,
            "completion_tokens": scored,
            "seconds_total": total,
            "tokens_per_second": real / total,
            "completion_tokens_per_second": scored / total,
            "cuda_peak_increase_mib": cuda_peak[name]["peak_increase_bytes"] / 2**20,
        }
    ratios = {
        "iqlearn_packed_over_sft_packed": results["iqlearn_packed"]["tokens_per_second"]
        / results["sft_packed"]["tokens_per_second"],
        "iqlearn_packed_over_iqlearn_padded": results["iqlearn_packed"]["tokens_per_second"]
        / results["iqlearn_padded"]["tokens_per_second"],
        "sft_packed_over_sft_padded": results["sft_packed"]["tokens_per_second"]
        / results["sft_padded"]["tokens_per_second"],
    }
    print(f"\n{'trainer':<26}{'tokens/s':>10}{'median s/step':>15}{'tokens/step':>13}")
    for name in TRAINERS:
        r = results[name]
        print(
            f"{LABELS[name]:<26}{r['tokens_per_second']:>10.0f}{r['median_s']:>15.3f}{r['real_tokens'] / args.steps:>13.0f}"
        )
    for key, ratio in ratios.items():
        print(f"tokens per second, {key.replace('_over_', ' / ').replace('_', ' ')}: {ratio:.3f}x")
    sizes = {k: getattr(args, k) for k in ("vocab", "hidden", "layers", "heads", "seq_len", "min_len", "batch_size")}
    return {
        "benchmark": "tokens per second: IQLearnTrainer packed vs padded, against SFTTrainer packed and padded",
        **provenance(args.device),
        "sizes": sizes | {"steps": args.steps, "warmup": args.warmup},
        "config": {**COST_OPTIMIZER, "bf16": args.bf16, "td_coef": args.td_coef},
        "results": results,
        "ratios": ratios,
        "wall_seconds": time.perf_counter() - start,
    }


def plot(record: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(record["results"])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([LABELS[n] for n in names], [record["results"][n]["tokens_per_second"] for n in names], color="#4c72b0")
    ax.set_ylabel("real tokens per second (timed steps)")
    ax.tick_params(axis="x", rotation=15, labelsize=8)
    sizes = record["sizes"]
    ax.set_title(
        f"{record['machine']['device']}: rows of {sizes['min_len']}-{sizes['seq_len']} tokens, batch "
        f"{sizes['batch_size']}, {sizes['layers']} layers, hidden {sizes['hidden']}, vocab {sizes['vocab']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512, help="longest row, and the packed rows' length")
    parser.add_argument("--min-len", type=int, default=32, help="shortest row")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per step (packed rows when packed)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per trainer")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per trainer before them")
    parser.add_argument("--td-coef", type=float, default=0.1)
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision for every trainer")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="vocab 4000, hidden 64, 2 layers, rows of 16-128, batch 4"
    )
    parser.add_argument("--output", help="JSON to write, a PNG beside it (default: results/packing_cost.json)")
    args = parser.parse_args()
    if args.quick:
        args.vocab, args.hidden, args.layers, args.seq_len, args.min_len = 4000, 64, 2, 128, 16
        args.batch_size, args.steps, args.warmup = 4, 4, 1
    if not 4 <= args.min_len <= args.seq_len:
        parser.error("--min-len must be between 4 and --seq-len")
    if args.output is None and not args.quick:
        args.output = str(Path(__file__).parent / "results" / "packing_cost.json")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    record = run(args)
    if args.output:
        write_json(args.output, record)
        plot(record, str(Path(args.output).with_suffix(".png")))
    print(f"total {record['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
