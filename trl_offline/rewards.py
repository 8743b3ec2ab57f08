"""Rewards for offline RL, computed once, before training, from `reward_funcs`.

A-LoL (Baheti et al. 2024) treats the whole completion as one action, so any sequence-level scorer can be the reward:
a classifier, a reward model, a hand-written function. `GRPOTrainer` calls its `reward_funcs` on every batch of
fresh generations; offline the completions are fixed, so each row is scored once and the reward stored as a column.
The reward functions follow GRPO's conventions, so one written for GRPO works here unchanged:

- a string is a path or hub id, loaded with `AutoModelForSequenceClassification` and `num_labels=1`;
- a model scores the text `prompt + completion` (the chat template applied to conversational rows) by `logits[:, 0]`;
- a callable is called as `f(prompts=..., completions=..., **columns)`, the dataset's other columns as keyword
  arguments, and returns one float per row, or `None` where it does not apply;
- the rewards of the functions are summed with `reward_weights`, skipping the `None`s (a `nansum`).

Online-only arguments GRPO also passes (`completion_ids`, `trainer_state`, `log_extra`, `log_metric`) have no
meaning before training and are not passed. Unlike GRPO, which only warns, a row that no function scores is an error:
it would otherwise train with a silent reward of 0.
"""

import asyncio
import inspect
import math
import numbers
from collections.abc import Callable

import torch
from datasets import Dataset
from datasets.fingerprint import Hasher, generate_random_fingerprint
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel
from transformers.utils import logging
from trl import apply_chat_template, is_conversational

from ._trl_compat import get_callable_name


logger = logging.get_logger(__name__)

RewardFunc = str | PreTrainedModel | Callable[..., list[float | None]]


def reward_func_name(reward_func) -> str:
    """Display name of a reward function, as GRPO names it: the model's id or the callable's name."""
    if isinstance(reward_func, torch.nn.Module):
        name_or_path = getattr(getattr(reward_func, "config", None), "name_or_path", "")
        return name_or_path.rstrip("/").split("/")[-1] or type(reward_func).__name__
    return get_callable_name(reward_func)


def load_reward_funcs(
    reward_funcs: RewardFunc | list[RewardFunc],
    reward_processing_classes=None,
    model_init_kwargs: dict | None = None,
) -> tuple[list, list]:
    """Normalise `reward_funcs` and `reward_processing_classes` to two lists of the same length, loading what is
    named by a string.

    A string becomes `AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **model_init_kwargs)`. A
    model gets its tokenizer loaded from `config.name_or_path` when none is given, with the eos token as pad token if
    it has none; the model's `pad_token_id` is set to the tokenizer's, since the model scores the last non-pad token.
    A callable is kept and its processing class ignored. Already loaded lists pass through unchanged.
    """
    reward_funcs = list(reward_funcs) if isinstance(reward_funcs, list | tuple) else [reward_funcs]
    if not reward_funcs:
        raise ValueError("`reward_funcs` is empty: pass at least one reward function.")
    if reward_processing_classes is None:
        reward_processing_classes = [None] * len(reward_funcs)
    elif not isinstance(reward_processing_classes, list | tuple):
        reward_processing_classes = [reward_processing_classes]
    reward_processing_classes = list(reward_processing_classes)
    if len(reward_processing_classes) != len(reward_funcs):
        raise ValueError(
            f"The number of reward processing classes ({len(reward_processing_classes)}) must match the number of "
            f"reward functions ({len(reward_funcs)})."
        )
    for i, reward_func in enumerate(reward_funcs):
        if isinstance(reward_func, str):
            reward_funcs[i] = AutoModelForSequenceClassification.from_pretrained(
                reward_func, num_labels=1, **(model_init_kwargs or {})
            )
        if isinstance(reward_funcs[i], PreTrainedModel):
            tokenizer = reward_processing_classes[i]
            if tokenizer is None:
                if not reward_funcs[i].config.name_or_path:
                    raise ValueError(
                        f"Reward model {i} ({type(reward_funcs[i]).__name__}) was not loaded from a path, so its "
                        "tokenizer cannot be found: pass it in `reward_processing_classes`."
                    )
                tokenizer = AutoTokenizer.from_pretrained(reward_funcs[i].config.name_or_path)
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.eos_token
            reward_funcs[i].config.get_text_config().pad_token_id = tokenizer.pad_token_id
            reward_processing_classes[i] = tokenizer
        elif not callable(reward_funcs[i]):
            raise TypeError(
                f"Reward function {i} must be a path or hub id, a model or a callable, got {type(reward_func).__name__}."
            )
    return reward_funcs, reward_processing_classes


def _score_with_model(model: torch.nn.Module, tokenizer, prompts: list, completions: list, device) -> list[float]:
    """`logits[:, 0]` of a sequence classifier on `prompt + completion`, as GRPO computes it."""
    if is_conversational({"prompt": prompts[0]}):
        texts = [apply_chat_template({"messages": p + c}, tokenizer)["text"] for p, c in zip(prompts, completions)]
    else:
        texts = [p + c for p, c in zip(prompts, completions)]
    # Right padding and no added special tokens, like GRPO: the chat template already holds them, and the model
    # reads the last non-pad token
    inputs = tokenizer(text=texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
    with torch.no_grad():
        logits = model(**inputs.to(device if device is not None else model.device)).logits  # (B, num_labels)
    return logits[:, 0].float().tolist()


def _call_reward_func(reward_func: Callable, prompts: list, completions: list, columns: dict) -> list:
    rewards = reward_func(prompts=prompts, completions=completions, **columns)
    if inspect.iscoroutine(rewards):  # GRPO accepts async reward functions; offline there is nothing to overlap
        rewards = asyncio.run(rewards)
    if isinstance(rewards, str) or not hasattr(rewards, "__len__"):
        raise ValueError(
            f"The reward function '{reward_func_name(reward_func)}' returned {type(rewards).__name__}; expected a "
            "list with one reward per row."
        )
    return list(rewards)


def _as_reward(value, name: str, row: int) -> float:
    """A returned reward as a float, NaN for `None` (this function does not apply to the row)."""
    if value is None:
        return math.nan
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if not isinstance(value, numbers.Real):
        raise ValueError(
            f"The reward function '{name}' returned {value!r} ({type(value).__name__}) for row {row}; expected a "
            "float or None."
        )
    if not math.isfinite(value):
        raise ValueError(f"The reward function '{name}' returned a non-finite reward ({value}) for row {row}.")
    return float(value)


def score_batch(
    batch: dict[str, list], first_row: int, reward_funcs: list, reward_processing_classes: list, weights: list, device
) -> list[float]:
    """Weighted sum of the rewards of every function for the rows of `batch` (columns to lists), rows `first_row` on
    (for the error messages). `reward_funcs` as [`load_reward_funcs`] returns them; `weights` one float per function."""
    prompts, completions = batch["prompt"], batch["completion"]
    columns = {key: value for key, value in batch.items() if key not in ("prompt", "completion")}
    # NaN where a function does not apply to a row. float64 keeps the callables' rewards exact
    rewards_per_func = torch.empty(len(prompts), len(reward_funcs), dtype=torch.float64)  # (B, F)
    for i, (reward_func, tokenizer) in enumerate(zip(reward_funcs, reward_processing_classes)):
        name = reward_func_name(reward_func)
        if isinstance(reward_func, torch.nn.Module):
            rewards = _score_with_model(reward_func, tokenizer, prompts, completions, device)
        else:
            rewards = _call_reward_func(reward_func, prompts, completions, columns)
        if len(rewards) != len(prompts):
            raise ValueError(
                f"The reward function '{name}' returned {len(rewards)} rewards for rows {first_row} to "
                f"{first_row + len(prompts) - 1}, but {len(prompts)} were expected (one per prompt-completion pair)."
            )
        rewards = [_as_reward(reward, name, first_row + j) for j, reward in enumerate(rewards)]
        rewards_per_func[:, i] = torch.tensor(rewards, dtype=torch.float64)
    uncovered = rewards_per_func.isnan().all(dim=1)  # (B,)
    if uncovered.any():
        row = first_row + int(uncovered.nonzero()[0])
        raise ValueError(f"Every reward function returned None for row {row}: no reward applies to it.")
    return (rewards_per_func * torch.tensor(weights, dtype=torch.float64)).nansum(dim=1).tolist()  # (B,)


def prepare_reward_funcs(reward_funcs, reward_processing_classes, reward_weights, device):
    """Load the reward functions, check the weights (one per function, 1.0 each by default), and put the models in
    eval mode on `device`; returns what [`score_batch`] takes."""
    reward_funcs, reward_processing_classes = load_reward_funcs(reward_funcs, reward_processing_classes)
    weights = [1.0] * len(reward_funcs) if reward_weights is None else [float(w) for w in reward_weights]
    if len(weights) != len(reward_funcs):
        raise ValueError(
            f"Number of reward weights ({len(weights)}) must match number of reward functions ({len(reward_funcs)})."
        )
    for reward_func in reward_funcs:
        if isinstance(reward_func, torch.nn.Module):
            reward_func.eval()
            if device is not None:
                reward_func.to(device)
    return reward_funcs, reward_processing_classes, weights


def _prepare(dataset: Dataset, reward_funcs, reward_processing_classes, reward_weights, device):
    missing = [column for column in ("prompt", "completion") if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"Computing rewards needs 'prompt' and 'completion' columns; the dataset has {dataset.column_names}, "
            f"missing {missing}."
        )
    return prepare_reward_funcs(reward_funcs, reward_processing_classes, reward_weights, device)


def compute_rewards(
    dataset: Dataset,
    reward_funcs: RewardFunc | list[RewardFunc],
    reward_processing_classes=None,
    reward_weights: list[float] | None = None,
    *,
    batch_size: int = 32,
    device: str | torch.device | None = None,
) -> list[float]:
    """The reward of every row of `dataset`: the `reward_weights`-weighted sum over `reward_funcs`, `None`s skipped.

    Args:
        dataset ([`~datasets.Dataset`]): Rows with `prompt` and `completion` (standard or conversational); other
            columns are passed to callables as keyword arguments.
        reward_funcs: A path or hub id, a sequence classification model or a callable, or a list of them (see
            [`load_reward_funcs`]).
        reward_processing_classes: Tokenizers of the reward models, one or a list aligned with `reward_funcs`.
        reward_weights (`list[float]`, *optional*): One weight per reward function, all 1.0 by default.
        batch_size (`int`): Rows per call of each reward function.
        device: Where the reward models run; they are moved there. Default: where they already are.

    Returns:
        `list[float]`, one reward per row. Raises `ValueError` naming the function and the row for a wrong number of
        rewards, a value that is not a number or None, a non-finite reward, or a row every function returned None for.
    """
    reward_funcs, reward_processing_classes, weights = _prepare(
        dataset, reward_funcs, reward_processing_classes, reward_weights, device
    )
    rewards = []
    for batch in dataset.iter(batch_size=batch_size):
        rewards += score_batch(batch, len(rewards), reward_funcs, reward_processing_classes, weights, device)
    return rewards


def rewards_fingerprint(dataset: Dataset, reward_funcs: list, reward_processing_classes: list, weights, column):
    """Fingerprint of `dataset` with its rewards added, the same for the same inputs so `datasets` reuses its cache.

    Callables are hashed as `datasets` hashes a `map` function (an importable function by its name, a lambda or a
    closure by its code and captured values). A model is identified by its class and `name_or_path`, not hashed:
    that would cost a pass over its weights, so retrain a reward model into a new folder, not over the old one.
    """
    hasher = Hasher()
    hasher.update(dataset._fingerprint)
    hasher.update(("trl_offline.rewards", column, weights))
    for reward_func, tokenizer in zip(reward_funcs, reward_processing_classes):
        if isinstance(reward_func, torch.nn.Module):
            identity = (type(reward_func).__qualname__, reward_func.config.name_or_path)
            identity += (tokenizer.name_or_path, tokenizer.chat_template, len(tokenizer))
        else:
            identity = reward_func
        try:
            hasher.update(identity)
        except Exception:  # as in `datasets`: what cannot be pickled is never reused from the cache
            logger.warning(
                f"Reward function '{reward_func_name(reward_func)}' cannot be hashed; rewards won't be cached."
            )
            return generate_random_fingerprint()
    return hasher.hexdigest()


def add_reward_column(
    dataset: Dataset,
    reward_funcs: RewardFunc | list[RewardFunc],
    reward_processing_classes=None,
    reward_weights: list[float] | None = None,
    *,
    column: str = "reward",
    batch_size: int = 32,
    device: str | torch.device | None = None,
) -> Dataset:
    """`dataset` with a `column` holding [`compute_rewards`]'s rewards, cached by `datasets`.

    The new fingerprint is derived from the dataset's and the reward functions' identity, so when the dataset is
    backed by cache files (loaded from disk or the hub, or mapped from such a dataset) a second call with the same
    inputs loads the rewards from the cache file instead of scoring again. An in-memory dataset is just scored.
    Arguments as in [`compute_rewards`]; raises `ValueError` if the dataset already has a `column` column.
    """
    if column in dataset.column_names:
        raise ValueError(f"The dataset already has a '{column}' column; remove it or choose another `column`.")
    reward_funcs, reward_processing_classes, weights = _prepare(
        dataset, reward_funcs, reward_processing_classes, reward_weights, device
    )

    def add_rewards(batch: dict[str, list], indices: list[int]) -> dict[str, list[float]]:
        return {column: score_batch(batch, indices[0], reward_funcs, reward_processing_classes, weights, device)}

    return dataset.map(
        add_rewards,
        batched=True,
        batch_size=batch_size,
        with_indices=True,
        new_fingerprint=rewards_fingerprint(dataset, reward_funcs, reward_processing_classes, weights, column),
        desc="Computing rewards",
    )
