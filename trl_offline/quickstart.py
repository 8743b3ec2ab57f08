"""The quickstart: IQLearn on a tiny model, offline, in about a minute on a CPU.

    python -m trl_offline.quickstart

It builds a tiny Llama and a character tokenizer (no hub), trains it with `IQLearnTrainer` on conversational
demonstrations of a toy task (sort the letters of the prompt), and reports, on held-out prompts, the mean reward of
greedy answers before and after training and how well the reward IQLearn extracts tells the expert's answer from a
corrupted one.
"""

import argparse
import os
import random
import tempfile

from datasets import Dataset

from . import IQLearnConfig, IQLearnTrainer
from .offline_kit import SORT_ALPHABET, build_tiny_model, make_dataset, mean_sort_reward


def _corrupt(answer: str, rng: random.Random) -> str:
    """The expert's answer with one letter replaced by a different one."""
    i = rng.randrange(len(answer))
    return answer[:i] + rng.choice(SORT_ALPHABET.replace(answer[i], "")) + answer[i + 1 :]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default=None, help="Where to write the model; a temporary folder by default.")
    parser.add_argument("--max_steps", type=int, default=400)
    parser.add_argument("--td_coef", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

    output_dir = args.output_dir or tempfile.mkdtemp(prefix="trl_offline_quickstart_")
    model_path = build_tiny_model(os.path.join(output_dir, "base-model"), seed=args.seed)
    train = make_dataset("conversational_prompt_completion", 2048, seed=args.seed)
    held_out = make_dataset("conversational_prompt_completion", 128, seed=args.seed + 1000)

    config = IQLearnConfig(
        output_dir=output_dir,
        td_coef=args.td_coef,
        max_steps=args.max_steps,
        per_device_train_batch_size=32,
        learning_rate=3e-3,
        lr_scheduler_type="cosine",
        warmup_steps=20,
        gradient_checkpointing=False,
        logging_steps=50,
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        report_to="none",
        seed=args.seed,
        disable_tqdm=True,
    )
    trainer = IQLearnTrainer(model=model_path, args=config, train_dataset=train)
    tokenizer = trainer.processing_class
    before = mean_sort_reward(trainer.model, tokenizer, held_out["prompt"])
    trainer.train()
    after = mean_sort_reward(trainer.model, tokenizer, held_out["prompt"])

    # Reward analysis: does the extracted reward prefer the expert's answer to a one-letter corruption of it?
    rng = random.Random(args.seed)
    corrupted = Dataset.from_list(
        [
            {
                "prompt": row["prompt"],
                "completion": [{"role": "assistant", "content": _corrupt(row["completion"][0]["content"], rng)}],
            }
            for row in held_out
        ]
    )
    expert_rewards = trainer.compute_implicit_rewards(held_out)
    corrupted_rewards = trainer.compute_implicit_rewards(corrupted)
    ranked = sum(e > c for e, c in zip(expert_rewards, corrupted_rewards)) / len(held_out)
    trainer.save_model()

    results = {"reward_before": before, "reward_after": after, "expert_ranked_above_corrupted": ranked}
    print(f"\nIQLearn quickstart (td_coef={args.td_coef}, {args.max_steps} steps), {len(held_out)} held-out prompts")
    print(f"  mean reward of greedy answers, before training: {before:.3f}")
    print(f"  mean reward of greedy answers, after training:  {after:.3f}")
    print(f"  extracted reward ranks the expert's answer above a corrupted one: {ranked:.0%} of prompts")
    print(f"  model saved to {output_dir}")
    return results


if __name__ == "__main__":
    main()
