"""Frontier: held-out reward against the KL(pi || pi_ref) it costs, for every KL-regularised trainer over a sweep of
its strength, measured against the exact KL-regularised optimum.

The task is quality.py's `thumbs`: sort the letters of a prompt; each behaviour prompt comes with four answers, the
expert's with a thumbs up and the three others with a thumbs down. The reward is that label: r = 1 for the expert's
answer, 0 for any other. The start, which is also every method's reference, is quality.py's (TRL's `SFTTrainer` on
every behaviour answer). From it, each method trains on quality.py's rows for that method, at quality.py's learning
rate, for the same steps of 32 sequences (DPO: 16 pairs), once per value of its strength:

- `DROTrainer`, `beta` on its default reward scaling (`"range"`: thumbs up and down differ by 1), and once with the
  paper's setting (`reward_scaling="std"`, `beta=1.0`); at two `beta`s with `value_network="policy_head"`; and at the
  same two with its value network replaced by the exact soft value V*(x) (below; the rewards minus V*(x), the value
  held at 0), which shows what a value network that tracked V* would gain; and at three `beta`s at KTO's learning
  rate (1e-4) rather than quality.py's DRO rate (1e-3);
- `KTOTrainer`, `beta` (desirable rows weighed up by the ratio of undesirable to desirable ones, as quality.py does);
- `DPOTrainer` on pairs (the expert's answer against each other answer of its prompt), `beta`;
- `ALoLTrainer` with `loss_type="alol_kl"`, its penalty `kl_coef`.

The swap check ("default vs default"): a KTO user's run, `KTOTrainer` with `KTOConfig`'s defaults (no desirable
weighting) at quality.py's KTO learning rate, and the same config dict with only the classes swapped to `DROTrainer` /
`DROConfig` (DRO's defaults, the same learning rate).

On the held-out prompts, each trained policy is scored by:

- sampled reward: the share of expert answers among samples at temperature 1 (no top-k or top-p, until eos);
- greedy reward: the share of prompts whose greedy answer is the expert's (quality.py's greedy scoring);
- KL(pi || pi_ref) of its own samples, by `metrics.completion_kl` (per-token full-vocabulary KL summed over each
  completion, eos included), with its standard error over prompts;
- where the samples go: the share that are the expert's answer, another answer of its length, or of a wrong length
  (eos early, late or never: every training answer has the expert's length, so these are answers no row shows).

The exact optimum: for each held-out prompt x, p(x) = pi_ref(expert answer + eos | x) from one teacher-forced pass of
the reference. The optimum of KL-regularised RL at strength b, pi* ∝ pi_ref exp(r / b), then has
E[r] = p e^(1/b) / (p e^(1/b) + 1 - p) and KL(pi* || pi_ref) = E[r] / b - log(p e^(1/b) + 1 - p), averaged over
prompts: the curve every method is measured against (no policy's sampled reward lies above it, up to noise; a greedy
reward can). The reference's own sampled reward must match the mean p(x), which checks that the sampler and p agree.
DRO aims at this optimum (with its `beta` times its reward scale as b), and its value network at the soft value
V*(x) = b' log E_ref[exp(r' / b')] on the rewards r' as its loss sees them: each DRO run reports the Pearson
correlation and RMSE of V(x) against V*(x).

Each method's reward at fixed KL budgets is read off its sweep by linear interpolation between the two points whose
KL brackets the budget (the points sorted by KL), never extrapolated. A JSON records every run, the optimum and the
budgets; a PNG plots sampled and greedy reward against KL.

    python benchmarks/frontier.py                   # one seed; writes results/frontier.{json,png}
    python benchmarks/frontier.py --seeds 0 1 2     # three seeds (each its own data, start and held-out prompts)
    python benchmarks/frontier.py --quick           # tiny sizes, two points per sweep: a smoke run (CI runs it)
"""

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import provenance, write_json
from metrics import completion_kl, pearson, until_eos_mask
from quality import (
    LEARNING_RATES,
    _run_args,
    behaviour_rows,
    build_trainer,
    held_out_prompts,
    method_dataset,
    pretrain_start,
)


TASK = "thumbs"
# Each sweep: quality.py's method (its rows, config and learning rate), the config field swept, its values (strongest
# regularisation first) and fixed config overrides
SWEEPS = {
    "dro": dict(method="dro", label="DRO", field="beta", values=(1.0, 0.5, 0.2, 0.1, 0.05, 0.02)),
    "dro_std": dict(
        method="dro", label="DRO, std scaling", field="beta", values=(1.0,), overrides={"reward_scaling": "std"}
    ),
    "dro_policy_head": dict(
        method="dro",
        label="DRO, value head on the policy",
        field="beta",
        values=(0.2, 0.1),
        overrides={"value_network": "policy_head"},
    ),
    "dro_kto_lr": dict(
        method="dro", label="DRO at KTO's learning rate", field="beta", values=(0.2, 0.1, 0.05), learning_rate=1e-4
    ),
    # DRO with its value network replaced by the exact soft value V*(x): what a value that tracked V* would gain
    "dro_exact_value": dict(
        method="dro", label="DRO, V = V* (exact)", field="beta", values=(0.2, 0.1), exact_value=True
    ),
    "kto": dict(method="kto", label="KTO", field="beta", values=(1.0, 0.3, 0.1, 0.03)),
    "dpo": dict(method="dpo", label="DPO (pairs)", field="beta", values=(1.0, 0.3, 0.1, 0.03)),
    # `alol_kl`'s penalty on a trained row has the gradient kl_coef * grad log pi(y|x): it lowers the row's
    # advantage A to A - kl_coef, and past A (about 0.7 for a thumbs up here) it pushes the row's log-probability down
    "alol_kl": dict(method="alol_kl", label="A-LoL KL", field="kl_coef", values=(0.3, 0.1, 0.03, 0.01)),
}
QUICK_VALUES = {
    "dro": (1.0, 0.1),
    "dro_std": (1.0,),
    "dro_policy_head": (0.1,),
    "dro_exact_value": (0.1,),
    "dro_kto_lr": (0.1,),
    "kto": (1.0, 0.1),
    "dpo": (1.0, 0.1),
    "alol_kl": (0.3, 0.1),
}
# `dro_exact_value`: the rewards as DRO's default scaling leaves them, minus V*(x), with the value network held at 0
# (its head is zero at initialisation and learns at a rate too small to move it)
EXACT_VALUE_CONFIG = {"reward_scaling": "none", "value_network": "policy_head", "value_learning_rate": 1e-12}
KL_BUDGETS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
QUICK_KL_BUDGETS = (0.1, 0.2, 0.3, 0.5, 1.0, 2.0)
# The optimum's strengths b, on the 0/1 reward
OPTIMUM_BETAS = tuple(10 ** (-2.5 + 4.5 * i / 199) for i in range(200))
# The kinds of sampled answers that `sampled_scores` counts
ANSWER_KINDS = ("expert", "same_length", "length")
# The reference's sampled reward may differ from the mean p(x) by this many standard errors at most
AGREEMENT_SES = 5.0


# -- the held-out prompts, the reference and the optimum -----------------------------------------------------------


def encode_eval_set(tokenizer, prompts: list) -> dict:
    """The prompts' token ids as the model is prompted (the chat template with the generation prompt) and the
    expert's answer to each, with its eos: the completion that earns r = 1."""
    from trl_offline.offline_kit import prompt_letters

    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    prompt_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    answers = ["".join(sorted(prompt_letters(p))) for p in prompts]
    answer_ids = [tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for a in answers]
    return {"prompts": prompts, "prompt_ids": prompt_ids, "answer_ids": answer_ids, "pad": tokenizer.pad_token_id}


def right_padded(sequences: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(map(len, sequences))
    ids = torch.tensor([s + [pad] * (length - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (length - len(s)) for s in sequences])
    return ids, mask


@torch.no_grad()
def expert_logps(reference, eval_set: dict, batch_size: int = 64) -> list[float]:
    """log pi_ref(expert answer + eos | x) per prompt, from one teacher-forced pass (TRL's `selective_log_softmax`
    for the token log-probabilities)."""
    from trl.trainer.utils import selective_log_softmax

    logps = []
    for start in range(0, len(eval_set["prompt_ids"]), batch_size):
        prompts = eval_set["prompt_ids"][start : start + batch_size]
        answers = eval_set["answer_ids"][start : start + batch_size]
        ids, mask = right_padded([p + a for p, a in zip(prompts, answers)], eval_set["pad"])
        answer_mask = torch.zeros_like(mask)
        for row, (p, a) in enumerate(zip(prompts, answers)):
            answer_mask[row, len(p) : len(p) + len(a)] = 1
        logits = reference(input_ids=ids, attention_mask=mask).logits.double()  # (B, T, V)
        token_logps = selective_log_softmax(logits[:, :-1], ids[:, 1:])  # (B, T - 1)
        logps += (token_logps * answer_mask[:, 1:]).sum(-1).tolist()
    return logps


def optimum_point(logps: list[float], beta: float) -> dict:
    """E[r] and KL(pi* || pi_ref) of pi* ∝ pi_ref exp(r / beta), r = 1 on the expert's answer (probability
    exp(logp) under the reference) and 0 elsewhere, averaged over prompts. In log space, so tiny betas do not
    overflow."""
    rewards, kls = [], []
    for logp in logps:
        log_normaliser = log_add_exp(logp + 1 / beta, log_rest(logp))  # log(p e^(1/beta) + 1 - p)
        reward = math.exp(logp + 1 / beta - log_normaliser)
        rewards.append(reward)
        kls.append(max(reward / beta - log_normaliser, 0.0))  # >= 0; clipped for rounding
    return {"beta": beta, "reward": statistics.mean(rewards), "kl": statistics.mean(kls)}


def optimum_curve(logps: list[float]) -> list[dict]:
    """The optimum at every strength of `OPTIMUM_BETAS`, strongest regularisation (largest beta) first."""
    return [optimum_point(logps, beta) for beta in sorted(OPTIMUM_BETAS, reverse=True)]


def optimum_reward_at_kl(logps: list[float], kl: float) -> float:
    """The largest reward any policy reaches within KL(pi || pi_ref) <= `kl`: the optimum's at KL(pi* || pi_ref) =
    `kl` (bisection on log beta: KL falls as beta rises), and 1.0 from the largest KL the optimum needs on (pi* on
    the expert's answer alone, at KL = mean -log p(x))."""
    if kl <= 0:
        return statistics.mean(math.exp(logp) for logp in logps)
    if kl >= statistics.mean(-logp for logp in logps):
        return 1.0
    low, high = math.log(1e-4), math.log(1e4)  # log beta: KL(low) > kl > KL(high)
    for _ in range(100):
        middle = (low + high) / 2
        if optimum_point(logps, math.exp(middle))["kl"] > kl:
            low = middle
        else:
            high = middle
    return optimum_point(logps, math.exp((low + high) / 2))["reward"]


def soft_values(logps: list[float], beta: float, shift: float, scale: float) -> list[float]:
    """V*(x) = beta log E_ref[exp(r' / beta)] on the rewards as DRO's loss sees them, r' = (r - shift) / scale."""
    up, down = (1 - shift) / scale, (0 - shift) / scale
    return [beta * log_add_exp(logp + up / beta, log_rest(logp) + down / beta) for logp in logps]


def log_rest(logp: float) -> float:
    """log(1 - p) from log p."""
    return math.log1p(-math.exp(logp)) if logp < 0 else -math.inf


def log_add_exp(a: float, b: float) -> float:
    """log(e^a + e^b) in double precision, without overflow."""
    high, low = max(a, b), min(a, b)
    return high if low == -math.inf else high + math.log1p(math.exp(low - high))


def exact_value_rows(rows: list[dict], beta: float, train_logps: dict[str, float]) -> list[dict]:
    """`rows` with `reward = r' - V*(x)`: the thumbs as DRO's default scaling leaves them (r' = label - the share of
    thumbs up; their range is 1) minus the soft value of `beta` on them, from the reference's log-probability of each
    training prompt's expert answer (`train_logps`, keyed by the prompt's letters). With `reward_scaling="none"` and
    V(x) held at 0, DRO's residual is then r' - V*(x) - beta * log-ratio: its loss with the exact value."""
    shift = statistics.mean(float(row["label"]) for row in rows)
    letters = list(train_logps)
    values = dict(zip(letters, soft_values([train_logps[x] for x in letters], beta, shift, 1.0)))
    return [{**row, "reward": float(row["label"]) - shift - values[row["prompt"][0]["content"]]} for row in rows]


# -- scoring a policy --------------------------------------------------------------------------------------------


@torch.no_grad()
def sampled_scores(policy, reference, eval_set: dict, args, seed: int) -> dict:
    """`args.samples` completions per prompt at temperature 1 (no top-k or top-p), until eos or
    `args.max_new_tokens`: their reward (the expert's answer, eos included) and KL(pi || pi_ref) (`completion_kl`),
    as means over prompts with their standard errors."""
    torch.manual_seed(seed)  # the same random stream for every policy of a seed
    eos, pad = policy.config.eos_token_id, eval_set["pad"]
    rewards, kls, lengths, truncated, kinds = [], [], [], [], []
    for start in range(0, len(eval_set["prompt_ids"]), args.eval_batch_size):
        prompts = eval_set["prompt_ids"][start : start + args.eval_batch_size]
        answers = eval_set["answer_ids"][start : start + args.eval_batch_size]
        width = max(map(len, prompts))  # left-padded, as `generate` expects
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        out = policy.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=1.0,
            top_k=0,  # transformers' sampling default is 50
            top_p=1.0,
            num_return_sequences=args.samples,
            max_new_tokens=args.max_new_tokens,
            pad_token_id=pad,
            eos_token_id=eos,
        )  # (B * samples, width + L), each prompt's samples together
        completions = out[:, width:]
        kept = until_eos_mask(completions, eos)  # (B * samples, L)
        rows_mask = mask.repeat_interleave(args.samples, 0)
        attention = torch.cat([rows_mask, torch.ones_like(completions)], -1)
        completion_mask = torch.cat([torch.zeros_like(rows_mask), kept], -1)
        kl = completion_kl(policy, reference, out, attention, completion_mask)  # (B * samples,)
        for row in range(len(out)):
            tokens = completions[row][kept[row].bool()].tolist()
            answer = answers[row // args.samples]
            rewards.append(float(tokens == answer))
            kinds.append("expert" if tokens == answer else "same_length" if len(tokens) == len(answer) else "length")
            lengths.append(len(tokens))
            truncated.append(float(eos not in tokens))
        kls += kl.tolist()
    reward_by_prompt, kl_by_prompt = per_prompt(rewards, args.samples), per_prompt(kls, args.samples)
    return {
        "sampled_reward": statistics.mean(reward_by_prompt),
        "sampled_reward_se": standard_error(reward_by_prompt),
        "kl": statistics.mean(kl_by_prompt),
        "kl_se": standard_error(kl_by_prompt),
        "mean_length": statistics.mean(lengths),
        "truncated_share": statistics.mean(truncated),
        # Where the samples' mass is: the expert's answer, another answer of its length (ending in eos where the
        # expert's does), or an answer whose eos came early, late or never
        "answer_kinds": {kind: kinds.count(kind) / len(kinds) for kind in ANSWER_KINDS},
    }


def per_prompt(values: list[float], samples: int) -> list[float]:
    """Means of consecutive groups of `samples` values: one per prompt."""
    return [statistics.mean(values[i : i + samples]) for i in range(0, len(values), samples)]


def standard_error(values: list[float]) -> float:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0


def score_policy(policy, reference, tokenizer, eval_set: dict, args, seed: int) -> dict:
    """Sampled scores, KL, and quality.py's greedy scores (share of expert answers, mean `sort_reward`)."""
    from trl_offline.quickstart import greedy_scores

    was_training = policy.training
    policy.eval()
    try:
        scores = sampled_scores(policy, reference, eval_set, args, seed)
    finally:
        policy.train(was_training)
    scores["greedy_reward"], scores["greedy_sort_reward"] = greedy_scores(policy, tokenizer, eval_set["prompts"])
    return scores


@torch.no_grad()
def prompt_values(trainer, eval_set: dict) -> list[float]:
    """DRO's value network V(x) on the held-out prompts."""
    policy = trainer.accelerator.unwrap_model(trainer.model).eval()
    values = []
    for start in range(0, len(eval_set["prompt_ids"]), 64):
        # Right-padded: positions from 0, as in training (the value reads each row's last prompt token)
        ids, mask = right_padded(eval_set["prompt_ids"][start : start + 64], eval_set["pad"])
        values += policy(input_ids=ids, attention_mask=mask, value_prompt_mask=mask).prompt_values.tolist()
    return values


def value_fit(trainer, eval_set: dict, logps: list[float]) -> dict:
    """DRO's value network V(x) on the held-out prompts against the soft value V*(x) of its `beta` on the rewards
    scaled as its loss sees them (`trainer.reward_shift`, `trainer.reward_scale`)."""
    values = prompt_values(trainer, eval_set)
    targets = soft_values(logps, trainer.args.beta, trainer.reward_shift, trainer.reward_scale)
    return {
        "pearson": pearson(values, targets),
        "rmse": math.sqrt(statistics.mean((v - t) ** 2 for v, t in zip(values, targets))),
        "value_mean": statistics.mean(values),
        "soft_value_mean": statistics.mean(targets),
        "reward_shift": trainer.reward_shift,
        "reward_scale": trainer.reward_scale,
    }


# -- the runs ----------------------------------------------------------------------------------------------------


def config_default(method: str, field: str, overrides: dict) -> float:
    """The value of `field` that the method's config takes when it is not set (with the sweep's overrides)."""
    from trl import DPOConfig, KTOConfig

    from trl_offline import ALoLConfig, DROConfig

    config_class = {"dro": DROConfig, "kto": KTOConfig, "dpo": DPOConfig}.get(method, ALoLConfig)
    with tempfile.TemporaryDirectory() as output_dir:
        return getattr(config_class(output_dir=output_dir, use_cpu=True, bf16=False, **overrides), field)


def sweep_learning_rate(sweep: dict) -> float:
    """The sweep's own learning rate, else quality.py's for its method."""
    return sweep.get("learning_rate", LEARNING_RATES[sweep["method"]])


def sweep_run(name: str, value: float, start: str, rows: list[dict], args, root: str, seed: int, context) -> dict:
    """One point of a sweep: train, then score (and, for DRO, compare its value network with V*)."""
    sweep = SWEEPS[name]
    learning_rate = sweep_learning_rate(sweep)
    tic = time.perf_counter()
    overrides = {**sweep.get("overrides", {}), sweep["field"]: value}
    task = TASK
    if sweep.get("exact_value"):
        rows, task = exact_value_rows(rows, value, context["train_logps"]), "rewarded"  # a `reward` column
        overrides.update(EXACT_VALUE_CONFIG)
    output_dir = os.path.join(root, f"{name}-{value:g}")
    trainer = build_trainer(sweep["method"], task, start, rows, args, output_dir, seed, learning_rate, **overrides)
    trainer.train()
    record = {"sweep": name, "field": sweep["field"], "value": value, "learning_rate": learning_rate}
    record.update(score_policy(trainer.model, context["reference"], context["tokenizer"], context["eval"], args, seed))
    if sweep.get("exact_value"):  # the value network must not have moved from 0
        record["largest_value"] = max(abs(v) for v in prompt_values(trainer, context["eval"]))
    elif sweep["method"] == "dro":
        record["value_fit"] = value_fit(trainer, context["eval"], context["logps"])
        # DRO's target: the optimum at beta times the reward scale, on the 0/1 reward
        record["optimum_at_beta"] = optimum_point(context["logps"], trainer.args.beta * trainer.reward_scale)
    record["seconds"] = time.perf_counter() - tic
    return record


def swap_runs(start: str, rows: list[dict], args, root: str, seed: int, context) -> dict:
    """A KTO user's run at `KTOConfig`'s defaults, and the same config dict with only the classes swapped to DRO's."""
    from trl import KTOConfig, KTOTrainer

    from trl_offline import DROConfig, DROTrainer

    dataset = method_dataset("kto", TASK, rows)
    runs = {}
    for name, config_class, trainer_class in (("kto", KTOConfig, KTOTrainer), ("dro", DROConfig, DROTrainer)):
        tic = time.perf_counter()
        config = dict(_run_args(os.path.join(root, f"swap-{name}"), args.steps, 32, LEARNING_RATES["kto"], seed))
        config["max_length"] = 128
        trainer = trainer_class(start, args=config_class(**config), train_dataset=dataset)
        trainer.train()
        runs[name] = {
            "trainer": trainer_class.__name__,
            "beta": trainer.args.beta,
            "learning_rate": config["learning_rate"],
        }
        runs[name].update(
            score_policy(trainer.model, context["reference"], context["tokenizer"], context["eval"], args, seed)
        )
        runs[name]["seconds"] = time.perf_counter() - tic
    return runs


def run_seed(seed: int, args) -> dict:
    """The reference, its optimum, every sweep point and the swap check on the data and start of `seed`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = behaviour_rows(args.prompts, seed)
    prompts = held_out_prompts(rows, args.held_out, seed)
    with tempfile.TemporaryDirectory() as root:
        start = pretrain_start(rows, args, root, seed)
        reference = AutoModelForCausalLM.from_pretrained(start).eval()
        tokenizer = AutoTokenizer.from_pretrained(start)
        context = {"reference": reference, "tokenizer": tokenizer, "eval": encode_eval_set(tokenizer, prompts)}
        context["logps"] = expert_logps(reference, context["eval"])
        train_prompts = list({row["prompt"][0]["content"]: row["prompt"] for row in rows}.values())
        train_logps = expert_logps(reference, encode_eval_set(tokenizer, train_prompts))
        context["train_logps"] = {p[0]["content"]: logp for p, logp in zip(train_prompts, train_logps)}
        reference_scores = score_policy(reference, reference, tokenizer, context["eval"], args, seed)
        agreement = check_reference_sampling(reference_scores, context["logps"], args.samples)
        print(
            f"seed {seed} reference: sampled reward {reference_scores['sampled_reward']:.3f}, exact mean p(x) "
            f"{agreement['mean_p']:.3f} ({agreement['z']:+.2f} standard errors)",
            flush=True,
        )
        runs = {}
        for name in SWEEPS:
            for value in args.sweep_values[name]:
                key = f"{name}@{value:g}"
                runs[key] = sweep_run(name, value, start, rows, args, root, seed, context)
                r = runs[key]
                fit = f"  V(x) vs V*: r {r['value_fit']['pearson']:.2f}" if "value_fit" in r else ""
                print(
                    f"seed {seed} {key:<16} sampled {r['sampled_reward']:.3f}  greedy {r['greedy_reward']:.3f}  "
                    f"KL {r['kl']:.3f} ± {r['kl_se']:.3f}{fit}  ({r['seconds']:.0f} s)",
                    flush=True,
                )
        swap = swap_runs(start, rows, args, root, seed, context)
    return {
        "reference": {**reference_scores, "sampling_check": agreement},
        "expert_logps": context["logps"],
        "optimum": optimum_curve(context["logps"]),
        "runs": runs,
        "swap": swap,
    }


def check_reference_sampling(scores: dict, logps: list[float], samples: int) -> dict:
    """The reference's sampled reward against its exact expectation, the mean p(x); an error past `AGREEMENT_SES`
    standard errors (the sampler and the teacher-forced p would disagree)."""
    ps = [math.exp(logp) for logp in logps]
    mean_p = statistics.mean(ps)
    # The sampled mean's standard error given these prompts: each sample is a coin of probability p(x)
    se = math.sqrt(sum(p * (1 - p) for p in ps) / samples) / len(ps)
    z = (scores["sampled_reward"] - mean_p) / max(se, 1e-12)
    if abs(scores["sampled_reward"] - mean_p) > AGREEMENT_SES * se + 1 / (len(ps) * samples):
        raise RuntimeError(
            f"The reference's sampled reward {scores['sampled_reward']:.4f} is {z:+.1f} standard errors from its "
            f"exact expectation {mean_p:.4f}: sampling and the teacher-forced p(x) disagree."
        )
    return {"mean_p": mean_p, "se": se, "z": z}


# -- the summary -------------------------------------------------------------------------------------------------

POINT_METRICS = ("sampled_reward", "sampled_reward_se", "greedy_reward", "kl", "kl_se")


def mean_over_seeds(records: list[dict]) -> dict:
    """Each metric's mean over seeds; a standard error of the mean of independent estimates; the spread over seeds."""
    point = {}
    for metric in ("sampled_reward", "greedy_reward", "kl"):
        values = [r[metric] for r in records]
        point[metric] = statistics.mean(values)
        point[f"{metric}_seed_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    for metric in ("sampled_reward", "kl"):
        point[f"{metric}_se"] = math.sqrt(sum(r[f"{metric}_se"] ** 2 for r in records)) / len(records)
    point["answer_kinds"] = {kind: statistics.mean(r["answer_kinds"][kind] for r in records) for kind in ANSWER_KINDS}
    return point


def interpolate(points: list[dict], kl: float, metric: str) -> dict | None:
    """`metric` at `kl` along `points` sorted by KL, linear between the two that bracket it; `None` outside them."""
    points = sorted(points, key=lambda p: p["kl"])
    for low, high in zip(points, points[1:]):
        if low["kl"] <= kl <= high["kl"]:
            weight = (kl - low["kl"]) / (high["kl"] - low["kl"]) if high["kl"] > low["kl"] else 0.0
            return {"value": low[metric] + weight * (high[metric] - low[metric]), "between": [low["key"], high["key"]]}
    return None


def summarise(seeds: dict, args) -> dict:
    """Every run, the swap check and the reference averaged over seeds; the optimum of the pooled prompts; each
    method's reward at the KL budgets."""
    first = next(iter(seeds.values()))
    runs = {}
    for key, run in first["runs"].items():
        runs[key] = {"key": key, **{k: run[k] for k in ("sweep", "field", "value", "learning_rate")}}
        runs[key].update(mean_over_seeds([seeds[s]["runs"][key] for s in seeds]))
        if "value_fit" in run:
            runs[key]["value_fit"] = {
                m: statistics.mean(seeds[s]["runs"][key]["value_fit"][m] for s in seeds) for m in ("pearson", "rmse")
            }
            runs[key]["optimum_at_beta"] = {
                m: statistics.mean(seeds[s]["runs"][key]["optimum_at_beta"][m] for s in seeds)
                for m in ("reward", "kl")
            }
    logps = [logp for s in seeds for logp in seeds[s]["expert_logps"]]  # equal prompts per seed: the mean of means
    for run in runs.values():
        run["optimum_reward_at_kl"] = optimum_reward_at_kl(logps, run["kl"])
    budgets = {}
    for name in SWEEPS:
        points = [run for run in runs.values() if run["sweep"] == name]
        budgets[name] = {}
        for budget in args.kl_budgets:
            sampled, greedy = (
                interpolate(points, budget, "sampled_reward"),
                interpolate(points, budget, "greedy_reward"),
            )
            budgets[name][f"{budget:g}"] = None if sampled is None else {
                "kl": budget, "sampled_reward": sampled["value"], "greedy_reward": greedy["value"],
                "between": sampled["between"],
            }  # fmt: skip
    budgets["optimum"] = {
        f"{b:g}": {"kl": b, "sampled_reward": optimum_reward_at_kl(logps, b)} for b in args.kl_budgets
    }
    return {
        "reference": mean_over_seeds([seeds[s]["reference"] for s in seeds]),
        "runs": runs,
        "swap": {name: mean_over_seeds([seeds[s]["swap"][name] for s in seeds]) for name in first["swap"]},
        "optimum": optimum_curve(logps),
        "budgets": budgets,
    }


# -- output ------------------------------------------------------------------------------------------------------

COLORS = {
    "dro": "#dd8452",
    "dro_std": "#c44e52",
    "dro_policy_head": "#937860",
    "dro_exact_value": "#da8bc3",
    "dro_kto_lr": "#8c613c",
    "kto": "#4c72b0",
    "dpo": "#55a868",
    "alol_kl": "#8172b3",
}


def plot(summary: dict, defaults: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(16, 5))
    optimum = summary["optimum"]
    # The optimum's curve runs on to KL = mean -log p(x); the axis stops a little past the runs' points
    kls = [run["kl"] for run in (*summary["runs"].values(), *summary["swap"].values())]
    kls += [run["optimum_at_beta"]["kl"] for run in summary["runs"].values() if "optimum_at_beta" in run]
    right = 1.5 * max(kls + [0.1])
    for ax, metric in zip(axes, ("sampled_reward", "greedy_reward")):
        ax.plot([p["kl"] for p in optimum], [p["reward"] for p in optimum], color="black", lw=1.5,
                label="exact optimum pi_ref exp(r/b) (sampled reward)")  # fmt: skip
        ax.plot([optimum[-1]["kl"], right], [optimum[-1]["reward"]] * 2, "--", color="black", lw=0.8)
        reference = summary["reference"]
        ax.plot([0.0], [reference[metric]], "o", color="#999999", ms=8, label="reference (SFT start)")
        for name, sweep in SWEEPS.items():
            points = [run for run in summary["runs"].values() if run["sweep"] == name]
            kls, values = [p["kl"] for p in points], [p[metric] for p in points]
            ax.plot(kls, values, "o-" if len(points) > 1 else "D", color=COLORS[name], label=sweep["label"])
            for p in points:
                if p["value"] == defaults[name]:
                    ax.plot([p["kl"]], [p[metric]], "*", color=COLORS[name], ms=16, mec="black")
                if metric == "sampled_reward" and name == "dro":  # where DRO's optimum at its beta lies
                    target = p["optimum_at_beta"]
                    ax.plot([target["kl"]], [target["reward"]], "o", mfc="none", color=COLORS[name], ms=7)
                    ax.plot([p["kl"], target["kl"]], [p[metric], target["reward"]], ":", color=COLORS[name], lw=0.8)
        for name, marker in (("kto", "P"), ("dro", "X")):
            run = summary["swap"][name]
            label = f"{'KTO' if name == 'kto' else 'DRO'} default vs default (KTO's lr)"
            ax.plot([run["kl"]], [run[metric]], marker, color=COLORS[name], ms=11, mec="black", label=label)
        ax.set_xlabel("KL(pi || pi_ref), nats, on the policy's samples (linear below 0.1, log above)")
        ax.set_ylabel(f"{metric.replace('_', ' ')} (share of expert answers)")
        ax.set_xscale("symlog", linthresh=0.1, linscale=0.5)  # KLs from 0 to tens of nats
        ax.set_xlim(0, right)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{metric.replace('_', ' ')} against KL; stars: defaults")
    axes[0].plot([], [], "o", mfc="none", color=COLORS["dro"], label="DRO's target: the optimum at its beta")
    fig.legend(*axes[0].get_legend_handles_labels(), fontsize=8, loc="center right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.77, 1))  # the legend on the right
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def print_tables(summary: dict, defaults: dict, args) -> None:
    print(f"\n{TASK}: {args.held_out} held-out prompts, {args.samples} samples each; {len(args.seeds)} seed(s)")
    print(
        f"{'run':<22}{'sampled':>16}{'greedy':>9}{'KL':>17}{'optimum at KL':>15}{'wrong length':>14}"
        f"{'V(x) r / RMSE':>16}"
    )
    ref = summary["reference"]
    print(
        f"{'reference':<22}{ref['sampled_reward']:>9.3f} ± {ref['sampled_reward_se']:.3f}{ref['greedy_reward']:>9.3f}"
        f"{'':>32}{ref['answer_kinds']['length']:>14.3f}"
    )
    for key, run in summary["runs"].items():
        mark = "*" if run["value"] == defaults[run["sweep"]] else " "
        optimum = f"{run['optimum_reward_at_kl']:.3f}"
        fit = run.get("value_fit")
        fit = "" if fit is None else f"{fit['pearson']:.2f} / {fit['rmse']:.3f}"
        print(
            f"{key + mark:<22}{run['sampled_reward']:>9.3f} ± {run['sampled_reward_se']:.3f}"
            f"{run['greedy_reward']:>9.3f}{run['kl']:>10.3f} ± {run['kl_se']:.3f}{optimum:>15}"
            f"{run['answer_kinds']['length']:>14.3f}{fit:>16}"
        )
    print("(* the config's default; wrong length: the share of samples whose eos came early, late or never)")
    print("\nDefault vs default (KTO's learning rate):")
    for name, run in summary["swap"].items():
        print(
            f"  {name.upper()}: sampled {run['sampled_reward']:.3f}  greedy {run['greedy_reward']:.3f}  "
            f"KL {run['kl']:.3f} ± {run['kl_se']:.3f}"
        )
    print(f"\nSampled reward at fixed KL budgets (nats): {', '.join(f'{b:g}' for b in args.kl_budgets)}")
    for name, budgets in summary["budgets"].items():
        cells = ["-" if cell is None else f"{cell['sampled_reward']:.3f}" for cell in budgets.values()]
        print(f"  {name:<18}" + "".join(f"{c:>9}" for c in cells))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--prompts", type=int, default=512, help="behaviour prompts (4 answers each)")
    parser.add_argument("--held-out", type=int, default=128, help="held-out prompts for the evaluation")
    parser.add_argument("--samples", type=int, default=8, help="samples per held-out prompt")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="sample length limit (answers: up to 7)")
    parser.add_argument("--eval-batch-size", type=int, default=32, help="prompts per sampling batch")
    parser.add_argument("--start-steps", type=int, default=300, help="SFT steps of the starting policy")
    parser.add_argument("--steps", type=int, default=200, help="training steps of every run")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads: the models are tiny, and one thread keeps the runs fast on a busy machine, where "
        "2 threads on 2 cores slowed the training steps 50-fold",
    )
    parser.add_argument("--quick", action="store_true", help="one seed, tiny sizes, two points per sweep")
    parser.add_argument("--output", help="JSON to write, a PNG beside it (default: results/frontier.json)")
    args = parser.parse_args()
    args.sweep_values = {name: sweep["values"] for name, sweep in SWEEPS.items()}
    args.kl_budgets = KL_BUDGETS
    if args.quick:
        args.seeds, args.prompts, args.held_out, args.samples, args.start_steps, args.steps = [0], 64, 16, 4, 150, 10
        args.sweep_values, args.kl_budgets = QUICK_VALUES, QUICK_KL_BUDGETS
    if args.output is None and not args.quick:
        args.output = str(Path(__file__).parent / "results" / "frontier.json")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    defaults = {name: config_default(s["method"], s["field"], s.get("overrides", {})) for name, s in SWEEPS.items()}
    seeds = {seed: run_seed(seed, args) for seed in args.seeds}
    summary = summarise(seeds, args)
    print_tables(summary, defaults, args)
    if args.output:
        sweeps = {
            name: {**sweep, "values": list(args.sweep_values[name]), "default": defaults[name],
                   "learning_rate": sweep_learning_rate(sweep)}
            for name, sweep in SWEEPS.items()
        }  # fmt: skip
        record = {
            "benchmark": "frontier: held-out reward against KL(pi || pi_ref) over each method's strength, and the "
            "exact KL-regularised optimum",
            **provenance("cpu"),
            "settings": {k: v for k, v in vars(args).items() if k not in ("output", "sweep_values")},
            "sweeps": sweeps,
            "summary": summary,
            "seeds": seeds,
            "wall_seconds": time.perf_counter() - start,
        }
        write_json(args.output, record)
        png = str(Path(args.output).with_suffix(".png"))
        plot(
            summary, defaults, png, f"{len(args.seeds)} seed(s), {args.steps} steps of 32 sequences from an SFT start"
        )
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
