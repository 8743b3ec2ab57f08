"""Quality: do the offline trainers beat TRL's on the same data, for the same budget? Side by side, in one run.

The task is the offline kit's: sort the letters of a prompt, scored by `sort_reward` (the share of positions right;
1.0 for the expert's answer). Every prompt of the behaviour data comes with four answers: the expert's, the letters
unsorted, the sorted letters reversed, and the expert's with one letter changed. The starting policy, which is also
every method's reference, is TRL's `SFTTrainer` on all those answers (a behaviour-cloning pretraining step). From it,
each method trains for the same number of steps on the same rows, 32 sequences a step (DPO: 16 pairs), and is scored
on held-out prompts by its greedy answers: the mean `sort_reward` and the share of expert answers.

Tasks:

- `rewarded` (A-LoL's setting): every answer carries its graded reward. The methods are SFT on all rows; SFT on the
  top-reward rows (filtered behaviour cloning: each prompt's best answer); DPO on pairs (each prompt's best answer
  against each worse one); KTO on labels (best answer up, the others down); the four A-LoL variants; DRO.
- `thumbs` (DRO's setting): only a thumbs up (the expert's answer) or down per answer. The methods are SFT on all rows;
  SFT on the thumbs-up rows; KTO; DRO; A-LoL.

Each method has one learning rate, the same for every seed and task (`LEARNING_RATES`); the KL-regularised methods
get their default strength (DPO/KTO beta 0.1; DRO its defaults, beta 0.1 on rewards scaled to a range of 1). KTO's
desirable rows are weighed up by the ratio of undesirable to desirable rows, as `KTOTrainer` recommends for unbalanced
labels. The table gives mean and standard deviation over seeds; a PNG plots them; a JSON records every run, the
machine and the command.

    python benchmarks/quality.py                    # both tasks, 3 seeds; writes results/quality.{json,png}
    python benchmarks/quality.py --quick            # one seed, few steps: a smoke run (CI runs it)
    python benchmarks/quality.py --tasks rewarded --methods dro --config '{"beta": 0.05}' --output /tmp/dro.json
                                                    # one method with config fields of your own
    python benchmarks/quality.py --tokenizer bpe    # from a start with the kit's byte-level BPE tokenizer
"""

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from common import cpu_run_args, provenance, write_json


TASKS = {
    "rewarded": ("start", "sft_all", "sft_top", "dpo", "kto", "alol", "alol_seq", "alol_ref_free", "alol_kl", "dro"),
    "thumbs": ("start", "sft_all", "sft_top", "kto", "dro", "alol"),
}
LEARNING_RATES = {"sft_all": 1e-3, "sft_top": 1e-3, "dpo": 1e-4, "kto": 1e-4, "dro": 1e-3}
LEARNING_RATES.update(dict.fromkeys(("alol", "alol_seq", "alol_ref_free", "alol_kl"), 1e-3))
# `--tune`: each method's learning rate is picked from these on a validation seed
LR_GRID = (3e-5, 1e-4, 3e-4, 1e-3, 3e-3)


def behaviour_rows(num_prompts: int, seed: int) -> list[dict]:
    """Four answers per prompt, with their reward, label and kind (conversational rows)."""
    from trl_offline.offline_kit import ANSWER_KINDS, mixed_quality_answers, sort_prompt, sort_reward

    rng = random.Random(seed)
    rows = []
    for _ in range(num_prompts):
        letters = sort_prompt(rng)
        answers = mixed_quality_answers(letters, rng)
        expert = answers[0]
        for kind, answer in zip(ANSWER_KINDS, answers):
            rows.append(
                {
                    "prompt": [{"role": "user", "content": letters}],
                    "completion": [{"role": "assistant", "content": answer}],
                    "reward": sort_reward(letters, answer),
                    "label": answer == expert,
                    "kind": kind,
                }
            )
    return rows


def held_out_prompts(rows: list[dict], num_prompts: int, seed: int) -> list:
    """Prompts whose letters the behaviour data never shows."""
    from trl_offline.offline_kit import sort_prompt

    seen = {row["prompt"][0]["content"] for row in rows}
    rng, prompts = random.Random(seed + 10_000), []
    while len(prompts) < num_prompts:
        letters = sort_prompt(rng)
        if letters not in seen:
            seen.add(letters)
            prompts.append([{"role": "user", "content": letters}])
    return prompts


def method_dataset(method: str, task: str, rows: list[dict]):
    """The rows as method `method` takes them."""
    from datasets import Dataset

    def group(rows):
        by_prompt = {}
        for row in rows:
            by_prompt.setdefault(row["prompt"][0]["content"], []).append(row)
        return by_prompt.values()

    plain = [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]
    if method == "sft_all":
        return Dataset.from_list(plain)
    if method == "sft_top":  # each prompt's best answer (the thumbs-up ones on `thumbs`)
        best = [
            max(answers, key=lambda r: r["reward"] if task == "rewarded" else r["label"]) for answers in group(rows)
        ]
        return Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in best])
    if method == "dpo":
        pairs = []
        for answers in group(rows):
            best = max(answers, key=lambda r: r["reward"])
            pairs += [
                {"prompt": best["prompt"], "chosen": best["completion"], "rejected": r["completion"]}
                for r in answers
                if r["reward"] < best["reward"]
            ]
        return Dataset.from_list(pairs)
    if method == "kto" or task == "thumbs":  # labels only
        return Dataset.from_list([{**p, "label": r["label"]} for p, r in zip(plain, rows)])
    return Dataset.from_list([{**p, "reward": r["reward"]} for p, r in zip(plain, rows)])  # A-LoL, DRO on rewards


def _run_args(output_dir: str, steps: int, batch_size: int, learning_rate: float, seed: int) -> dict:
    return cpu_run_args(
        output_dir,
        steps=steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        warmup_steps=min(10, steps // 10),
        seed=seed,
    )


def build_trainer(
    method: str,
    task: str,
    start: str,
    rows: list[dict],
    args,
    output_dir: str,
    seed: int,
    learning_rate: float,
    **config_overrides,
):
    """The trainer of `method` from the start model, not yet trained. `config_overrides` set fields of its config
    (e.g. a sweep's `beta`) over this benchmark's settings."""
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, SFTConfig, SFTTrainer

    from trl_offline import ALoLConfig, ALoLTrainer, DROConfig, DROTrainer

    dataset = method_dataset(method, task, rows)
    batch_size = 16 if method == "dpo" else 32  # 32 sequences a step
    common = _run_args(output_dir, args.steps, batch_size, learning_rate, seed)
    if method.startswith("sft"):
        return SFTTrainer(start, args=SFTConfig(**common, **config_overrides), train_dataset=dataset)
    common["max_length"] = 128
    if method == "kto":
        # A quarter of the rows are desirable: weigh them up as TRL's KTOTrainer recommends for unbalanced labels
        num_desirable = sum(dataset["label"])
        common["desirable_weight"] = (len(dataset) - num_desirable) / max(num_desirable, 1)
    elif method.startswith("alol"):
        common["loss_type"] = method
    config = {**common, **config_overrides}
    if method == "dpo":
        return DPOTrainer(start, args=DPOConfig(**config), train_dataset=dataset)
    if method == "kto":
        return KTOTrainer(start, args=KTOConfig(**config), train_dataset=dataset)
    if method == "dro":
        return DROTrainer(start, args=DROConfig(**config), train_dataset=dataset)
    return ALoLTrainer(start, args=ALoLConfig(**config), train_dataset=dataset)


def train(
    method: str, task: str, start: str, rows: list[dict], args, output_dir: str, seed: int, learning_rate: float
):
    """Trains `method` from the start model, with `args.config` over its config; returns the trained trainer."""
    trainer = build_trainer(method, task, start, rows, args, output_dir, seed, learning_rate, **args.config)
    trainer.train()
    return trainer


def pretrain_start(rows: list[dict], args, root: str, seed: int, tokenizer: str = "char") -> str:
    """The starting policy and reference: a tiny Llama with the kit's `tokenizer` (`"char"` or `"bpe"`), then
    `SFTTrainer` on every behaviour answer."""
    from trl import SFTConfig, SFTTrainer

    from trl_offline.offline_kit import build_tiny_model

    base = build_tiny_model(os.path.join(root, "base"), seed=seed, tokenizer=tokenizer)
    config = SFTConfig(**_run_args(os.path.join(root, "start"), args.start_steps, 32, 3e-3, seed))
    trainer = SFTTrainer(base, args=config, train_dataset=method_dataset("sft_all", "rewarded", rows))
    trainer.train()
    trainer.save_model()
    return config.output_dir


def run_seed(task: str, seed: int, args, learning_rates: dict, grid: tuple | None = None) -> dict:
    """Every method of `task` from the SFT start of `seed`, scored on held-out prompts. With `grid`, every method
    runs once per learning rate of the grid, and the results are keyed `(method, learning_rate)`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = behaviour_rows(args.prompts, seed)
    prompts = held_out_prompts(rows, args.held_out, seed)
    results = {}
    with tempfile.TemporaryDirectory() as root:
        start = pretrain_start(rows, args, root, seed, args.tokenizer)
        for method in task_methods(task, args):
            for learning_rate in (grid or (learning_rates.get(method),)) if method != "start" else (None,):
                tic = time.perf_counter()
                config = {}
                if method == "start":
                    model, tokenizer = (
                        AutoModelForCausalLM.from_pretrained(start),
                        AutoTokenizer.from_pretrained(start),
                    )
                else:
                    output_dir = os.path.join(root, f"{method}-{learning_rate}")
                    trainer = train(method, task, start, rows, args, output_dir, seed, learning_rate)
                    model, tokenizer = trainer.model, trainer.processing_class
                    config = {field: getattr(trainer.args, field) for field in args.config}  # as the trainer ran
                key = method if grid is None or method == "start" else f"{method}@{learning_rate:g}"
                results[key] = {**greedy_record(model, tokenizer, prompts), "seconds": time.perf_counter() - tic}
                reward, expert_share = results[key]["reward"], results[key]["expert_share"]
                if config:
                    results[key]["config"] = config
                if method == "start":
                    results[key]["vocabulary"] = len(tokenizer)  # which of the kit's tokenizers it has
                print(f"{task} seed {seed} {key:<20} reward {reward:.3f}  expert {expert_share:.0%}", flush=True)
    return results


GREEDY_KINDS = ("expert", "unsorted", "reversed", "changed", "other")


def answer_kind(letters: str, answer: str) -> str:
    """Which of the behaviour data's kinds of answer `answer` is (`"changed"`: any one letter off the expert's), or
    `"other"`."""
    expert = "".join(sorted(letters))
    if answer == expert:
        return "expert"
    if answer == letters:
        return "unsorted"
    if answer == expert[::-1]:
        return "reversed"
    if len(answer) == len(expert) and sum(a != b for a, b in zip(answer, expert)) == 1:
        return "changed"
    return "other"


def greedy_record(model, tokenizer, prompts: list) -> dict:
    """The greedy answers' mean `sort_reward`, their share of expert answers, and the share of each kind of answer."""
    from trl_offline.offline_kit import greedy_completions, prompt_letters, sort_reward

    letters = [prompt_letters(p) for p in prompts]
    answers = greedy_completions(model, tokenizer, prompts)
    rewards = [sort_reward(x, a) for x, a in zip(letters, answers)]
    kinds = [answer_kind(x, a) for x, a in zip(letters, answers)]
    return {
        "reward": statistics.mean(rewards),
        "expert_share": rewards.count(1.0) / len(rewards),
        "answer_kinds": {kind: kinds.count(kind) / len(kinds) for kind in GREEDY_KINDS},
    }


def task_methods(task: str, args) -> tuple[str, ...]:
    """The methods of `task` that this run trains (`--methods`; all by default), after the start."""
    return tuple(m for m in TASKS[task] if m == "start" or args.methods is None or m in args.methods)


def tune(task: str, args) -> tuple[dict, dict]:
    """Each method's learning rate: the grid's best mean held-out reward on `--tune-seed` (its own behaviour data,
    start and prompts, never used for the reported seeds)."""
    results = run_seed(task, args.tune_seed, args, {}, grid=LR_GRID)
    chosen = {}
    for method in task_methods(task, args):
        if method != "start":
            scores = {lr: results[f"{method}@{lr:g}"] for lr in LR_GRID}
            chosen[method] = max(LR_GRID, key=lambda lr: (scores[lr]["reward"], scores[lr]["expert_share"]))
    return chosen, results


def summarise(runs: dict) -> dict:
    """`runs[task][seed][method]` -> `{task: {method: {metric: {mean, std}}}}`."""
    table = {}
    for task, seeds in runs.items():
        table[task] = {}
        for method in next(iter(seeds.values())):
            table[task][method] = {}
            for metric in ("reward", "expert_share"):
                values = [seeds[seed][method][metric] for seed in seeds]
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                table[task][method][metric] = {"mean": statistics.mean(values), "std": std, "values": values}
            table[task][method]["answer_kinds"] = {
                kind: statistics.mean(seeds[seed][method]["answer_kinds"][kind] for seed in seeds)
                for kind in GREEDY_KINDS
            }
    return table


def plot(table: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(table), figsize=(6 * len(table), 4), squeeze=False)
    for ax, (task, methods) in zip(axes[0], table.items()):
        names = list(methods)
        means = [methods[m]["reward"]["mean"] for m in names]
        stds = [methods[m]["reward"]["std"] for m in names]
        colors = ["#999999" if n == "start" else "#4c72b0" if n.startswith(("sft", "dpo", "kto")) else "#dd8452"
                  for n in names]  # fmt: skip
        ax.bar(names, means, yerr=stds, color=colors, capsize=3)
        ax.set_title(f"{task}: greedy mean sort_reward, held-out prompts")
        ax.set_ylim(0, 1.05)
        ax.tick_params(axis="x", rotation=45)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--prompts", type=int, default=512, help="behaviour prompts (4 answers each)")
    parser.add_argument("--held-out", type=int, default=128, help="held-out prompts for the evaluation")
    parser.add_argument("--start-steps", type=int, default=300, help="SFT steps of the starting policy")
    parser.add_argument("--steps", type=int, default=200, help="training steps of every method")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=sorted({m for methods in TASKS.values() for m in methods} - {"start"}),
        help="train only these methods (the start is always scored)",
    )
    parser.add_argument(
        "--config",
        type=json.loads,
        default={},
        help="config fields set on every trained method, as JSON, e.g. '{\"beta\": 0.05}' with --methods dro",
    )
    parser.add_argument(
        "--tokenizer", choices=("char", "bpe"), default="char", help="the tiny model's tokenizer: the kit's two"
    )
    parser.add_argument("--tune", action="store_true", help="pick each method's learning rate from LR_GRID first")
    parser.add_argument("--tune-seed", type=int, default=100, help="the validation seed of `--tune`")
    parser.add_argument("--quick", action="store_true", help="one seed, 64 prompts, 40 + 20 steps")
    parser.add_argument("--output", help="JSON to write, a PNG beside it (default: results/quality.json)")
    args = parser.parse_args()
    if not isinstance(args.config, dict):
        parser.error(f"--config must be a JSON object of config fields, got {args.config!r}")
    for method in args.methods or ():
        if not any(method in TASKS[task] for task in args.tasks):
            parser.error(f"--methods {method} is not a method of --tasks {' '.join(args.tasks)}")
    if args.quick:
        args.seeds, args.prompts, args.held_out, args.start_steps, args.steps = [0], 64, 16, 40, 20
    if args.output is None and not args.quick:
        args.output = str(Path(__file__).parent / "results" / "quality.json")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

    start = time.perf_counter()
    learning_rates, tuning = {task: dict(LEARNING_RATES) for task in args.tasks}, {}
    if args.tune:
        for task in args.tasks:
            chosen, tuning[task] = tune(task, args)
            learning_rates[task].update(chosen)
            print(f"{task}: learning rates chosen on seed {args.tune_seed}: {chosen}", flush=True)
    runs = {
        task: {seed: run_seed(task, seed, args, learning_rates[task]) for seed in args.seeds} for task in args.tasks
    }
    table = summarise(runs)
    for task, methods in table.items():
        print(f"\n{task} ({len(args.seeds)} seeds): greedy answers to {args.held_out} held-out prompts")
        print(f"{'method':<16}{'reward':>16}{'expert share':>18}")
        for method, metrics in methods.items():
            r, e = metrics["reward"], metrics["expert_share"]
            print(f"{method:<16}{r['mean']:>9.3f} ± {r['std']:.3f}{e['mean']:>11.1%} ± {e['std']:.1%}")
    if args.output:
        record = {
            "benchmark": "quality: greedy reward on held-out prompts after equal budgets, offline trainers vs TRL's",
            **provenance("cpu"),
            "settings": {k: v for k, v in vars(args).items() if k != "output"},
            "learning_rates": learning_rates,
            "tuning": tuning,
            "summary": table,
            "runs": runs,
            "wall_seconds": time.perf_counter() - start,
        }
        write_json(args.output, record)
        png = str(Path(args.output).with_suffix(".png"))
        plot(table, png, f"{len(args.seeds)} seeds, {args.steps} steps of 32 sequences from an SFT start")
        print(f"wrote {png}")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
