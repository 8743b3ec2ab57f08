"""The quickstart: IQLearn, A-LoL and DRO on a tiny model, offline, in well under a minute on a CPU.

    python -m trl_offline.quickstart                   # all three
    python -m trl_offline.quickstart --trainer dro     # one of them

It builds a tiny Llama and a character tokenizer (no hub) and teaches it a toy task (sort the letters of the prompt)
three times, from the same starting model:

- IQLearn (`IQLearnTrainer`) imitates the expert's answers; it reports the mean reward of greedy answers to held-out
  prompts before and after training, and how well the reward IQLearn extracts tells the expert's answer from a
  corrupted one.
- A-LoL (`ALoLTrainer`) learns from answers of mixed quality, each with its reward (a quarter expert answers, the
  others wrong in three ways); it reports the mean reward of the training answers and of greedy answers to prompts
  it never saw, before and after training.
- DRO (`DROTrainer`) learns from a thumbs up or down per answer (KTO's `label`: up for the expert's answers only).
  KL-regularised RL stays near its reference, so it starts, as in practice, from an SFT model: TRL's `SFTTrainer` on
  the same answers without their labels. It reports the share of expert answers and the mean reward of greedy answers
  to unseen prompts, for the SFT model and after DRO.
"""

import argparse
import os
import random
import tempfile
import time

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from . import ALoLConfig, ALoLTrainer, DROConfig, DROTrainer, IQLearnConfig, IQLearnTrainer
from .offline_kit import (
    build_tiny_model,
    change_one_letter,
    greedy_completions,
    make_dataset,
    make_scored_dataset,
    mean_sort_reward,
    prompt_letters,
    sort_reward,
)


TRAINERS = ("iqlearn", "alol", "dro")


# Both runs: a CPU, no checkpoints or trackers, a log every 50 steps
CPU_RUN = dict(
    gradient_checkpointing=False,
    logging_steps=50,
    save_strategy="no",
    use_cpu=True,
    bf16=False,
    report_to="none",
    disable_tqdm=True,
)


def run_iqlearn(
    model_path: str, output_dir: str, *, max_steps: int = 400, td_coef: float = 0.03, seed: int = 0
) -> dict[str, float]:
    """IQLearn on expert demonstrations of the sorting task; returns the held-out rewards before and after, and how
    often the extracted reward ranks the expert's answer above a corrupted one."""
    train = make_dataset("conversational_prompt_completion", 2048, seed=seed)
    held_out = make_dataset("conversational_prompt_completion", 128, seed=seed + 1000)

    config = IQLearnConfig(
        output_dir=output_dir,
        td_coef=td_coef,
        max_steps=max_steps,
        per_device_train_batch_size=32,
        learning_rate=3e-3,
        lr_scheduler_type="cosine",
        warmup_steps=20,
        seed=seed,
        **CPU_RUN,
    )
    trainer = IQLearnTrainer(model=model_path, args=config, train_dataset=train)
    tokenizer = trainer.processing_class
    before = mean_sort_reward(trainer.model, tokenizer, held_out["prompt"])
    trainer.train()
    after = mean_sort_reward(trainer.model, tokenizer, held_out["prompt"])

    # Reward analysis: does the extracted reward prefer the expert's answer to a one-letter corruption of it?
    rng = random.Random(seed)
    corrupted = Dataset.from_list(
        [
            {
                "prompt": row["prompt"],
                "completion": [
                    {"role": "assistant", "content": change_one_letter(row["completion"][0]["content"], rng)}
                ],
            }
            for row in held_out
        ]
    )
    expert_rewards = trainer.compute_implicit_rewards(held_out)
    corrupted_rewards = trainer.compute_implicit_rewards(corrupted)
    ranked = sum(e > c for e, c in zip(expert_rewards, corrupted_rewards)) / len(held_out)
    trainer.save_model()

    print(f"\nIQLearn quickstart (td_coef={td_coef}, {max_steps} steps), {len(held_out)} held-out prompts")
    print(f"  mean reward of greedy answers, before training: {before:.3f}")
    print(f"  mean reward of greedy answers, after training:  {after:.3f}")
    print(f"  extracted reward ranks the expert's answer above a corrupted one: {ranked:.0%} of prompts")
    print(f"  model saved to {output_dir}")
    return {"reward_before": before, "reward_after": after, "expert_ranked_above_corrupted": ranked}


def unseen_prompts(seen: list, num_prompts: int, seed: int) -> list:
    """`num_prompts` conversational sorting prompts whose letters are not among those of `seen`."""
    seen_letters = {prompt_letters(p) for p in seen}
    prompts, batch_seed = [], seed
    while len(prompts) < num_prompts:
        for prompt in make_dataset("conversational_prompt_completion", num_prompts, seed=batch_seed)["prompt"]:
            if prompt_letters(prompt) not in seen_letters and len(prompts) < num_prompts:
                seen_letters.add(prompt_letters(prompt))
                prompts.append(prompt)
        batch_seed += 1
    return prompts


def run_alol(
    model_path: str,
    output_dir: str,
    *,
    max_steps: int = 300,
    num_rows: int = 2048,
    num_held_out: int = 128,
    per_device_train_batch_size: int = 32,
    learning_rate: float = 3e-3,
    loss_type: str = "alol",
    priority_sampling: bool = True,
    seed: int = 0,
    save: bool = True,
    verbose: bool = True,
) -> dict[str, float]:
    """A-LoL on sorting answers of mixed quality with a `reward` (`make_scored_dataset`); returns the mean reward of
    the training answers, the fraction of rows A-LoL trains on (reward above the value head's estimate), and the
    mean reward of greedy answers to unseen prompts before and after training."""
    train = make_scored_dataset("conversational_prompt_completion", num_rows, seed=seed)
    held_out = unseen_prompts(train["prompt"], num_held_out, seed=seed + 1000)

    config = ALoLConfig(
        output_dir=output_dir,
        loss_type=loss_type,
        priority_sampling=priority_sampling,
        max_steps=max_steps,
        per_device_train_batch_size=per_device_train_batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=min(10, max_steps // 10),
        max_length=128,
        seed=seed,
        **CPU_RUN,
    )
    start = time.perf_counter()
    # No `reward_funcs`, so the value head is fit on the data's own rewards (the trainer warns about it): V(x) then
    # estimates the data's average answer, and A-LoL keeps the answers better than that
    trainer = ALoLTrainer(model=model_path, args=config, train_dataset=train)
    tokenizer = trainer.processing_class
    before = mean_sort_reward(trainer.model, tokenizer, held_out)
    trainer.train()
    after = mean_sort_reward(trainer.model, tokenizer, held_out)
    seconds = time.perf_counter() - start
    if save:
        trainer.save_model()

    results = {
        "data_reward": sum(train["reward"]) / len(train),
        "positive_fraction": trainer.precompute_metrics["advantage/positive_fraction"],
        "reward_before": before,
        "reward_after": after,
    }
    if verbose:
        print(
            f"\nA-LoL quickstart (loss_type={loss_type}, {max_steps} steps), {len(train)} scored answers, "
            f"{len(held_out)} unseen prompts"
        )
        print(f"  mean reward of the training answers:                 {results['data_reward']:.3f}")
        print(f"  answers above the value head's estimate (trained on): {results['positive_fraction']:.0%}")
        print(f"  mean reward of greedy answers, before training:      {before:.3f}")
        print(f"  mean reward of greedy answers, after training:       {after:.3f}")
        print(f"  value fit, reference passes, training and evaluation took {seconds:.0f} s")
        if save:
            print(f"  model saved to {output_dir}")
    return results


def greedy_scores(model, tokenizer, prompts: list) -> tuple[float, float]:
    """The share of greedy answers that are the expert's (a thumbs up) and their mean `sort_reward`."""
    completions = greedy_completions(model, tokenizer, prompts)
    rewards = [sort_reward(prompt_letters(p), c) for p, c in zip(prompts, completions)]
    return sum(r == 1.0 for r in rewards) / len(rewards), sum(rewards) / len(rewards)


def run_dro(
    model_path: str,
    output_dir: str,
    *,
    max_steps: int = 200,
    sft_steps: int = 300,
    num_rows: int = 2048,
    num_held_out: int = 128,
    learning_rate: float = 1e-3,
    value_network: str = "separate",
    seed: int = 0,
    save: bool = True,
    verbose: bool = True,
) -> dict[str, float]:
    """SFT on sorting answers of mixed quality (`make_scored_dataset`, labels dropped), then DRO on the same answers
    with their thumbs up or down; returns the share of expert answers and the mean reward of greedy answers to unseen
    prompts, for the SFT model and after DRO."""
    train = make_scored_dataset("conversational_prompt_completion", num_rows, seed=seed, score="label")
    held_out = unseen_prompts(train["prompt"], num_held_out, seed=seed + 1000)
    schedule = dict(per_device_train_batch_size=32, lr_scheduler_type="cosine", seed=seed, **CPU_RUN)

    start = time.perf_counter()
    sft_dir = os.path.join(output_dir, "sft")
    sft_config = SFTConfig(output_dir=sft_dir, max_steps=sft_steps, learning_rate=3e-3, warmup_steps=10, **schedule)
    sft = SFTTrainer(model=model_path, args=sft_config, train_dataset=train.remove_columns("label"))
    sft.train()
    sft.save_model()
    sft_seconds = time.perf_counter() - start

    config = DROConfig(
        output_dir=output_dir,
        max_steps=max_steps,
        learning_rate=learning_rate,
        warmup_steps=min(10, max_steps // 10),
        max_length=128,
        value_network=value_network,
        **schedule,
    )
    # The SFT model is the policy's start and the reference; the value network starts from its body too
    trainer = DROTrainer(model=sft_dir, args=config, train_dataset=train)
    tokenizer = trainer.processing_class
    expert_before, reward_before = greedy_scores(trainer.model, tokenizer, held_out)
    trainer.train()
    expert_after, reward_after = greedy_scores(trainer.model, tokenizer, held_out)
    dro_seconds = time.perf_counter() - start - sft_seconds
    if save:
        trainer.save_model()

    results = {
        "data_thumbs_up": sum(train["label"]) / len(train),
        "expert_share_before": expert_before,
        "expert_share_after": expert_after,
        "reward_before": reward_before,
        "reward_after": reward_after,
    }
    if verbose:
        print(
            f"\nDRO quickstart (beta={config.beta}, {max_steps} steps after {sft_steps} of SFT), {len(train)} answers "
            f"with a thumbs up or down, {len(held_out)} unseen prompts"
        )
        print(f"  answers with a thumbs up in the data:          {results['data_thumbs_up']:.0%}")
        print(f"  greedy answers that are the expert's, SFT:     {expert_before:.0%}")
        print(f"  greedy answers that are the expert's, DRO:     {expert_after:.0%}")
        print(f"  mean reward of greedy answers, SFT:            {reward_before:.3f}")
        print(f"  mean reward of greedy answers, DRO:            {reward_after:.3f}")
        print(f"  SFT took {sft_seconds:.0f} s; DRO's reference passes, training and evaluation {dro_seconds:.0f} s")
        if save:
            print(f"  model saved to {output_dir} (value network in {os.path.join(output_dir, 'value')})")
    return results


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainer", choices=("all", *TRAINERS), default="all", help="Which trainer(s) to run.")
    parser.add_argument(
        "--output_dir",
        default=None,
        help="Where to write the models (one folder per trainer); a temporary folder by default.",
    )
    parser.add_argument(
        "--max_steps",
        type=int,
        default=None,
        help="Steps of each run (default: 400 IQLearn, 300 A-LoL, 200 DRO after 300 of SFT).",
    )
    parser.add_argument("--td_coef", type=float, default=0.03, help="IQLearn's TD coefficient (its default).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

    output_dir = args.output_dir or tempfile.mkdtemp(prefix="trl_offline_quickstart_")
    model_path = build_tiny_model(os.path.join(output_dir, "base-model"), seed=args.seed)
    steps = {} if args.max_steps is None else {"max_steps": args.max_steps}
    results = {}
    if args.trainer in ("all", "iqlearn"):
        results["iqlearn"] = run_iqlearn(
            model_path, os.path.join(output_dir, "iqlearn"), td_coef=args.td_coef, seed=args.seed, **steps
        )
    if args.trainer in ("all", "alol"):
        results["alol"] = run_alol(model_path, os.path.join(output_dir, "alol"), seed=args.seed, **steps)
    if args.trainer in ("all", "dro"):
        dro_steps = {} if args.max_steps is None else {"max_steps": args.max_steps, "sft_steps": args.max_steps}
        results["dro"] = run_dro(model_path, os.path.join(output_dir, "dro"), seed=args.seed, **dro_steps)
    return results


if __name__ == "__main__":
    main()
