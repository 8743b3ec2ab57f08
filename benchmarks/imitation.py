"""Imitation: IQLearn over a sweep of `td_coef` against TRL's `SFTTrainer`, on demonstrations from a known expert
distribution with many valid answers. Side by side, in one run.

The task: the prompt is 4 or 5 distinct letters of 12, in random order; a valid answer is any ordering of exactly
those letters (24 or 120 of them). The task reward of an answer is its sortedness, `1 - inversions / max_inversions`
(1.0 for the sorted letters, 0.0 for the reversed ones), and 0.0 for an answer that is not an ordering of the
letters. The expert is Boltzmann-rational for that reward: a Mallows distribution, `p(y | x) ∝ exp(-theta *
inversions(y))`, which puts a fifth (4 letters) or a tenth (5 letters) of its mass on the sorted answer and spreads
the rest over every ordering. Since the expert's distribution is known, the distance of a model's to it is measured
exactly, by scoring every valid answer.

128 of the 1287 letter sets are held out; the demonstrations (one expert sample each) come from the others, at each
of two data sizes. Two starts, as users have them: a randomly initialised tiny Llama, and the same model first trained
with `SFTTrainer` on behaviour data of the task's format (a third of its answers random valid orderings, the rest
with a letter replaced, dropped or doubled: about a third of its samples are valid), fine-tuned at a lower learning
rate for fewer steps. From each start every method trains on the same demonstrations with the same budget: the same steps, batches of the same rows in the same order (so the same tokens, which the JSON
records), learning rate and schedule. `SFTTrainer` and every `IQLearnTrainer` then differ only in the loss;
`td_coef=0` is IQLearn's own MLE, which should match SFT. On the held-out prompts:

- task success: the share of valid answers among samples at temperature 1, and the model's exact expected task
  reward (every valid answer scored; invalid answers score 0);
- diversity of 8 samples per prompt: distinct answers, distinct-2 and distinct-3 within each prompt's samples, and
  self-BLEU (character n-grams up to 4), averaged over prompts; the expert's own samples give the target;
- distance to the expert: the exact total variation distance and KL(expert || model) per prompt, averaged;
- reward analysis (Wulfmeier et al. 2024): Spearman's correlation between the reward each model implies
  (`IQLearnTrainer.compute_implicit_rewards`: the sum over the answer of `Q(s, a) - gamma * V(s')`, with the logits
  as Q; for the SFT model the same formula on its logits) and the true task reward, pooled over every valid answer of
  every held-out prompt, and over one expert answer per prompt, where only a reward whose level is comparable
  across prompts ranks well (as in the paper's analysis, one output per input).

    python benchmarks/imitation.py            # both starts, 1024 and 4096 demonstrations, 3 seeds; results/imitation.*
    python benchmarks/imitation.py --starts pretrained --demonstrations 1024   # one start, one data size
    python benchmarks/imitation.py --quick    # one seed, few steps: a smoke run (CI runs it)
"""

import argparse
import itertools
import math
import os
import random
import statistics
import tempfile
import time
from functools import cache
from pathlib import Path

from common import cpu_run_args, provenance, write_json
from metrics import distinct_n, kl_divergence, self_bleu, spearman, total_variation


ALPHABET = "abcdefghijkl"
LENGTHS = (4, 5)
THETA = 0.7  # the expert's Mallows dispersion: larger is closer to always sorting
BEHAVIOUR_ERRORS = ("replace", "drop", "double")  # how the behaviour data's invalid answers go wrong
STARTS = ("random", "pretrained")
TD_COEFS = (0.0, 0.03, 0.1, 0.3, 1.0)
SAMPLES_PER_PROMPT = 8
METRICS = (
    "valid_share",
    "expected_reward",
    "distinct_answers",
    "distinct_2",
    "distinct_3",
    "self_bleu",
    "total_variation",
    "kl_to_expert",
    "reward_spearman",
    "reward_spearman_one_per_prompt",
)


# The task and its expert


def inversions(answer: str) -> int:
    return sum(a > b for a, b in itertools.combinations(answer, 2))


def task_reward(letters: str, answer: str) -> float:
    """Sortedness of a valid answer, 0.0 for an answer that is not an ordering of `letters`."""
    if sorted(answer) != sorted(letters):
        return 0.0
    n = len(letters)
    return 1 - inversions(answer) / (n * (n - 1) / 2)


@cache
def expert_distribution(letters: str) -> dict[str, float]:
    """The expert's probability of every valid answer: Mallows around the sorted letters."""
    answers = ["".join(p) for p in itertools.permutations(sorted(letters))]
    weights = [math.exp(-THETA * inversions(a)) for a in answers]
    total = sum(weights)
    return {a: w / total for a, w in zip(answers, weights)}


def expert_sample(letters: str, rng: random.Random) -> str:
    distribution = expert_distribution(letters)
    return rng.choices(list(distribution), weights=list(distribution.values()))[0]


def split_letter_sets(num_held_out: int, seed: int) -> tuple[list[str], list[str]]:
    """Every letter set of the task (1287 of them), shuffled and split: `num_held_out` for the evaluation, the rest
    for the demonstrations, so no held-out prompt's letters appear in training in any order."""
    letter_sets = ["".join(c) for n in LENGTHS for c in itertools.combinations(ALPHABET, n)]
    random.Random(seed).shuffle(letter_sets)
    return letter_sets[num_held_out:], letter_sets[:num_held_out]


def shuffled(letters: str, rng: random.Random) -> str:
    return "".join(rng.sample(letters, len(letters)))


def demonstrations(letter_sets: list[str], num_demonstrations: int, seed: int) -> list[dict]:
    """One expert answer each to prompts drawn from `letter_sets` (more demonstrations than sets repeat sets, in other
    orders and with other answers), as conversational prompt-completion rows."""
    return _answered_prompts(letter_sets, num_demonstrations, expert_sample, random.Random(seed))


def _answered_prompts(letter_sets: list[str], num_rows: int, answer, rng: random.Random) -> list[dict]:
    """Conversational rows: the letters of a set drawn from `letter_sets`, shuffled, and `answer(letters, rng)`."""
    rows = []
    for _ in range(num_rows):
        letters = shuffled(rng.choice(letter_sets), rng)
        rows.append(
            {
                "prompt": [{"role": "user", "content": letters}],
                "completion": [{"role": "assistant", "content": answer(letters, rng)}],
            }
        )
    return rows


def behaviour_answer(letters: str, rng: random.Random) -> str:
    """A noisy behaviour policy of the task's format: a uniformly random ordering of the letters (valid, but not the
    expert's Mallows preference for sorted ones) a third of the time, otherwise an ordering with one letter replaced,
    dropped or doubled (invalid)."""
    answer = shuffled(letters, rng)
    if rng.random() < 1 / 3:
        return answer
    position = rng.randrange(len(answer))
    error = rng.choice(BEHAVIOUR_ERRORS)
    if error == "replace":
        others = [c for c in ALPHABET if c not in letters]
        return answer[:position] + rng.choice(others) + answer[position + 1 :]
    if error == "drop":
        return answer[:position] + answer[position + 1 :]
    return answer[:position] + answer[position] + answer[position:]  # "double"


def behaviour_rows(letter_sets: list[str], num_rows: int, seed: int) -> list[dict]:
    """The behaviour data a pretrained start is first trained on: the task's format, answers mostly invalid."""
    return _answered_prompts(letter_sets, num_rows, behaviour_answer, random.Random(seed + 40_000))


# Training


def pretrain(base: str, rows: list[dict], args, output_dir: str, seed: int) -> str:
    """The pretrained start: `base` trained with TRL's `SFTTrainer` on behaviour data (`behaviour_rows`), as users start
    from a model already trained on the task's kind of data, before any method sees a demonstration."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(**cpu_run_args(output_dir, steps=args.pretrain_steps, batch_size=32, learning_rate=3e-3,
                                      warmup_steps=20, seed=seed))  # fmt: skip
    trainer = SFTTrainer(base, args=config, train_dataset=Dataset.from_list(rows))
    trainer.train()
    trainer.save_model()
    return output_dir


def train(method: str, base: str, rows: list[dict], args, output_dir: str, seed: int) -> tuple[str, int]:
    """Trains `"sft"` or `"iqlearn@<td_coef>"` from `base`; returns the saved model's folder and the tokens seen."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from trl_offline import IQLearnConfig, IQLearnTrainer

    steps, learning_rate = (args.steps, args.learning_rate) if args.start == "random" else args.finetune
    common = cpu_run_args(
        output_dir,
        steps=steps,
        batch_size=32,
        learning_rate=learning_rate,
        warmup_steps=min(20, steps // 10),
        seed=seed,
    )
    common.update(logging_strategy="steps", logging_steps=steps)  # one log, at the end: it has the tokens seen
    dataset = Dataset.from_list(rows)
    if method == "sft":
        trainer = SFTTrainer(base, args=SFTConfig(**common), train_dataset=dataset)
    else:
        # "iqlearn@<td_coef>" with the default soft value, "iqlearn-logsumexp@<td_coef>" with V = logsumexp(logits)
        name, td_coef = method.split("@")
        soft_value = {"iqlearn": {}, "iqlearn-logsumexp": {"soft_value": "logsumexp"}}[name]
        config = IQLearnConfig(**common, td_coef=float(td_coef), **soft_value)
        trainer = IQLearnTrainer(base, args=config, train_dataset=dataset)
    trainer.train()
    trainer.save_model()
    num_tokens = next(log["num_tokens"] for log in reversed(trainer.state.log_history) if "num_tokens" in log)
    return output_dir, num_tokens


# Evaluation


def answer_log_probs(model, tokenizer, prompts: list[str], answers: list[str], batch_size: int = 512) -> list[float]:
    """`log pi(answer | prompt)`, the answer's characters and the end-of-turn token that ends generation."""
    import torch

    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]  # fmt: skip
    log_probs = []
    model.eval()
    for start in range(0, len(texts), batch_size):
        chunk = slice(start, start + batch_size)
        prompt_ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts[chunk]]
        answer_ids = [tokenizer(a + tokenizer.eos_token, add_special_tokens=False).input_ids for a in answers[chunk]]
        lengths = torch.tensor([len(p) + len(a) for p, a in zip(prompt_ids, answer_ids)])  # (B,)
        input_ids = torch.full((len(lengths), int(lengths.max())), tokenizer.pad_token_id)  # (B, T), right-padded
        answer_mask = torch.zeros_like(input_ids, dtype=torch.bool)  # (B, T)
        for i, (p, a) in enumerate(zip(prompt_ids, answer_ids)):
            input_ids[i, : len(p) + len(a)] = torch.tensor(p + a)
            answer_mask[i, len(p) : len(p) + len(a)] = True
        attention_mask = (torch.arange(input_ids.shape[1]) < lengths[:, None]).long()  # (B, T)
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]  # (B, T-1, V)
        token_log_probs = logits.log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
        log_probs += (token_log_probs * answer_mask[:, 1:]).sum(-1).tolist()
    return log_probs


def samples(model, tokenizer, prompts: list[str], k: int, seed: int) -> list[list[str]]:
    """`k` answers per prompt at temperature 1, no top-k or top-p truncation."""
    import torch

    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]  # fmt: skip
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    torch.manual_seed(seed)
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(
                **batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=k, max_new_tokens=8
            )
    finally:
        tokenizer.padding_side = padding_side
    decoded = [
        c.strip() for c in tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    ]
    return [decoded[i * k : (i + 1) * k] for i in range(len(prompts))]


def diversity(groups: list[list[str]]) -> dict[str, float]:
    """Within each prompt's samples, averaged over prompts."""
    return {
        "distinct_answers": statistics.mean(len(set(g)) / len(g) for g in groups),
        "distinct_2": statistics.mean(distinct_n(g, 2) for g in groups),
        "distinct_3": statistics.mean(distinct_n(g, 3) for g in groups),
        "self_bleu": statistics.mean(self_bleu(g) for g in groups),
    }


def evaluate(path: str, prompts: list[str], seed: int) -> dict[str, float]:
    """Every metric of one trained model on the held-out prompts."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_offline import IQLearnConfig, IQLearnTrainer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    pairs = [(p, a) for p in prompts for a in expert_distribution(p)]  # every valid answer of every prompt
    log_probs = answer_log_probs(model, tokenizer, [p for p, _ in pairs], [a for _, a in pairs])
    model_probs = {}
    for (p, a), log_prob in zip(pairs, log_probs):
        model_probs.setdefault(p, {})[a] = math.exp(log_prob)
    groups = samples(model, tokenizer, prompts, SAMPLES_PER_PROMPT, seed)
    results = {
        "valid_share": statistics.mean(sorted(s) == sorted(p) for p, g in zip(prompts, groups) for s in g),
        "expected_reward": statistics.mean(sum(q * task_reward(p, a) for a, q in model_probs[p].items()) for p in prompts),
        "total_variation": statistics.mean(total_variation(expert_distribution(p), model_probs[p]) for p in prompts),
        "kl_to_expert": statistics.mean(kl_divergence(expert_distribution(p), model_probs[p]) for p in prompts),
        **diversity(groups),
    }  # fmt: skip

    # The reward each model implies, scored by the trainer's own method (no training: `td_coef` plays no part)
    rows = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": a}]}
         for p, a in pairs]
    )  # fmt: skip
    config = IQLearnConfig(output_dir=os.path.join(path, "scoring"), use_cpu=True, bf16=False, report_to="none",
                           per_device_eval_batch_size=256, disable_tqdm=True)  # fmt: skip
    scorer = IQLearnTrainer(path, args=config, train_dataset=rows)  # a trainer needs one; it never trains here
    implicit = scorer.compute_implicit_rewards(rows)
    results["reward_spearman"] = spearman(implicit, [task_reward(p, a) for p, a in pairs])
    # One answer per prompt, as a dataset of single demonstrations has: only rewards comparable across prompts rank
    # these well. Each prompt's answer is an expert sample, the same for every method.
    rng = random.Random(seed + 30_000)
    one_each = {p: expert_sample(p, rng) for p in prompts}
    picked = [i for i, (p, a) in enumerate(pairs) if one_each[p] == a]
    results["reward_spearman_one_per_prompt"] = spearman(
        [implicit[i] for i in picked], [task_reward(*pairs[i]) for i in picked]
    )
    return results


def expert_row(prompts: list[str], seed: int) -> dict[str, float]:
    """The expert's own figures: the targets."""
    rng = random.Random(seed + 20_000)
    groups = [[expert_sample(p, rng) for _ in range(SAMPLES_PER_PROMPT)] for p in prompts]
    expected = [sum(q * task_reward(p, a) for a, q in expert_distribution(p).items()) for p in prompts]
    return {"valid_share": 1.0, "expected_reward": statistics.mean(expected), "total_variation": 0.0,
            "kl_to_expert": 0.0, **diversity(groups)}  # fmt: skip


def run_seed(num_demonstrations: int, seed: int, args) -> dict:
    """Every method on `num_demonstrations` demonstrations of `seed`, from the same initialisation."""
    from trl_offline.offline_kit import build_tiny_model

    train_sets, held_out_sets = split_letter_sets(args.held_out, seed)
    rows = demonstrations(train_sets, num_demonstrations, seed)
    rng = random.Random(seed + 10_000)
    prompts = [shuffled(letters, rng) for letters in held_out_sets]
    results = {"expert": expert_row(prompts, seed)}
    with tempfile.TemporaryDirectory() as root:
        base = build_tiny_model(os.path.join(root, "base"), hidden_size=args.hidden_size, seed=seed)
        if args.start == "pretrained":
            behaviour = behaviour_rows(train_sets, 32 * args.pretrain_steps, seed)
            base = pretrain(base, behaviour, args, os.path.join(root, "pretrained"), seed)
            results["start"] = evaluate(base, prompts, seed)
        for method in args.methods:
            tic = time.perf_counter()
            path, num_tokens = train(method, base, rows, args, os.path.join(root, method), seed)
            results[method] = {**evaluate(path, prompts, seed), "num_tokens": num_tokens,
                               "seconds": time.perf_counter() - tic}  # fmt: skip
            r = results[method]
            print(
                f"{args.start} start, {num_demonstrations} demos, seed {seed}, {method:<13} valid {r['valid_share']:.3f}  "
                f"reward {r['expected_reward']:.3f}  TV {r['total_variation']:.3f}  KL {r['kl_to_expert']:.3f}  "
                f"self-BLEU {r['self_bleu']:.3f}  distinct {r['distinct_answers']:.3f}  "
                f"spearman {r['reward_spearman']:+.3f} / {r['reward_spearman_one_per_prompt']:+.3f}  "
                f"tokens {num_tokens:.0f}",
                flush=True,
            )
    return results


def summarise(runs: dict) -> dict:
    """`runs[setting][seed][method][metric]` -> `{setting: {method: {metric: {mean, std, values}}}}`."""
    table = {}
    for setting, seeds in runs.items():
        table[setting] = {}
        for method in next(iter(seeds.values())):
            table[setting][method] = {}
            for metric in METRICS:
                values = [seeds[seed][method][metric] for seed in seeds if metric in seeds[seed][method]]
                if values:
                    std = statistics.stdev(values) if len(values) > 1 else 0.0
                    table[setting][method][metric] = {"mean": statistics.mean(values), "std": std, "values": values}
    return table


def plot(table: dict, path: str, title: str) -> None:
    """One row of panels per data size: each metric over the `td_coef` sweep, SFT and the expert as bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("expected_reward", "task success: expected task reward"),
        ("total_variation", "distance to the expert: total variation"),
        ("self_bleu", "diversity: self-BLEU of 8 samples (lower: more diverse)"),
        ("reward_spearman_one_per_prompt", "reward analysis: Spearman(implied, true)"),
    )
    fig, axes = plt.subplots(len(table), len(panels), figsize=(5 * len(panels), 3.6 * len(table)), squeeze=False)
    for row, (setting, methods) in zip(axes, table.items()):
        iqlearn = sorted((m for m in methods if m.startswith("iqlearn@")), key=lambda m: float(m.split("@")[1]))
        positions = range(len(iqlearn))
        for ax, (metric, label) in zip(row, panels):
            means = [methods[m][metric]["mean"] for m in iqlearn]
            stds = [methods[m][metric]["std"] for m in iqlearn]
            ax.errorbar(positions, means, yerr=stds, marker="o", capsize=3, color="#dd8452", label="IQLearn")
            coefs = [m.split("@")[1] for m in iqlearn]
            for m in (m for m in methods if m.startswith("iqlearn-logsumexp@") and m.split("@")[1] in coefs):
                ax.errorbar(coefs.index(m.split("@")[1]), methods[m][metric]["mean"], yerr=methods[m][metric]["std"],
                            marker="x", capsize=3, color="#c44e52", linestyle="none", label=f"{m} (V = logsumexp)")  # fmt: skip
            bands = (("sft", "--", "#4c72b0", "SFTTrainer"), ("expert", ":", "#555555", "expert"),
                     ("start", "-.", "#55a868", "start"))  # fmt: skip
            for name, style, color, band_label in bands:
                if metric in methods.get(name, {}):
                    mean, std = methods[name][metric]["mean"], methods[name][metric]["std"]
                    ax.axhline(mean, linestyle=style, color=color, label=band_label)
                    ax.axhspan(mean - std, mean + std, color=color, alpha=0.12)
            ax.set_xticks(list(positions), [m.split("@")[1] for m in iqlearn])
            ax.set_xlabel("td_coef")
            ax.set_title(f"{setting}\n{label}", fontsize=9)
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--td-coefs", nargs="+", type=float, default=list(TD_COEFS), help="IQLearn's sweep")
    parser.add_argument(
        "--logsumexp-td-coefs", nargs="*", type=float, default=[0.1],
        help="IQLearn with soft_value='logsumexp' (the logits as Q-values), for comparison",
    )  # fmt: skip
    parser.add_argument(
        "--demonstrations", nargs="+", type=int, default=[1024, 4096], help="data sizes (one demonstration a prompt)"
    )
    parser.add_argument("--held-out", type=int, default=128, help="held-out prompts for the evaluation")
    parser.add_argument("--steps", type=int, default=600, help="training steps of every method (32 rows a step)")
    parser.add_argument("--learning-rate", type=float, default=3e-3, help="every method's peak learning rate")
    parser.add_argument("--hidden-size", type=int, default=128, help="hidden size of the tiny Llama (2 layers)")
    parser.add_argument(
        "--starts", nargs="+", choices=STARTS, default=list(STARTS),
        help="random: every method from a random initialisation; pretrained: from a model first trained on behaviour "
        "data of the task's format (mostly invalid answers)",
    )  # fmt: skip
    parser.add_argument("--pretrain-steps", type=int, default=1000, help="SFT steps of 32 behaviour rows (pretrained)")
    parser.add_argument(
        "--finetune", nargs=2, type=float, default=[200, 3e-4], metavar=("STEPS", "LR"),
        help="steps and learning rate of every method from the pretrained start",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="one seed, 128 demonstrations, 16 prompts, 20 steps")
    parser.add_argument("--output", help="JSON to write, a PNG beside it (default: results/imitation.json)")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.demonstrations, args.held_out, args.steps = [0], [128], 16, 20
        args.hidden_size, args.td_coefs, args.pretrain_steps, args.finetune = 64, [0.0, 0.1], 10, [10, 3e-4]
        args.logsumexp_td_coefs = []
    args.finetune = (int(args.finetune[0]), args.finetune[1])
    if args.output is None and not args.quick:
        args.output = str(Path(__file__).parent / "results" / "imitation.json")
    args.methods = ["sft"] + [f"iqlearn@{c:g}" for c in args.td_coefs]
    args.methods += [f"iqlearn-logsumexp@{c:g}" for c in args.logsumexp_td_coefs]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()

    start = time.perf_counter()
    runs = {}
    for initialisation in args.starts:
        args.start = initialisation
        for n in args.demonstrations:
            runs[f"{initialisation} start, {n} demonstrations"] = {
                seed: run_seed(n, seed, args) for seed in args.seeds
            }
    del args.start
    table = summarise(runs)
    for setting, methods in table.items():
        print(f"\n{setting} ({len(args.seeds)} seeds, {args.held_out} held-out prompts): mean ± std")
        print(f"{'method':<14}" + "".join(f"{m[:20]:>22}" for m in METRICS))
        for method, metrics in methods.items():
            cells = (f"{metrics[m]['mean']:.3f} ± {metrics[m]['std']:.3f}" if m in metrics else "-" for m in METRICS)
            print(f"{method:<14}" + "".join(f"{c:>22}" for c in cells))
    if args.output:
        record = {
            "benchmark": "imitation: IQLearn over td_coef vs SFTTrainer on a known expert distribution",
            **provenance("cpu"),
            "settings": {k: v for k, v in vars(args).items() if k != "output"} | {"theta": THETA},
            "summary": table,
            "runs": runs,
            "wall_seconds": time.perf_counter() - start,
        }
        write_json(args.output, record)
        png = str(Path(args.output).with_suffix(".png"))
        title = (
            f"{len(args.seeds)} seeds; random start: {args.steps} steps of 32 at lr {args.learning_rate:g}; pretrained "
            f"start: {args.finetune[0]} steps at lr {args.finetune[1]:g}"
        )
        plot(table, png, title)
        print(f"wrote {png}")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
