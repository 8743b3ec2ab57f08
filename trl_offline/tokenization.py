"""Rewarded rows tokenized for [`OfflineRLTrainer`] as TRL's `KTOTrainer` tokenizes its rows: `prompt_ids` and
`completion_ids` that fit in `max_length`, beside a float `reward`."""

from datasets import Dataset, IterableDataset
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging
from trl import is_conversational
from trl.data_utils import common_prefix_length, get_dataset_column_names

from ._trl_compat import tokenize
from .data import chat_template_kwargs, drop_long_prompts, map_kwargs, to_rewarded_dataset


logger = logging.get_logger(__name__)


def tokenize_row(row: dict, tokenizer: PreTrainedTokenizerBase) -> dict[str, list[int]]:
    """Prompt and completion ids as TRL's `KTOTrainer` makes them: conversational rows through the chat template
    with their `tools` and `chat_template_kwargs`, standard ones with an eos after the completion; the completion
    starts where the tokenized prompt and prompt + completion diverge."""
    if is_conversational(row):
        kwargs = chat_template_kwargs(row)
        prompt_ids = tokenize(tokenizer, row["prompt"], add_generation_prompt=True, **kwargs)["input_ids"]
        full_ids = tokenize(tokenizer, row["prompt"] + row["completion"], **kwargs)["input_ids"]
    else:
        completion = row["completion"]
        if tokenizer.eos_token and not completion.endswith(tokenizer.eos_token):
            completion += tokenizer.eos_token
        prompt_ids = tokenize(tokenizer, row["prompt"])["input_ids"]
        full_ids = tokenize(tokenizer, row["prompt"] + completion)["input_ids"]
    prompt_len = common_prefix_length(prompt_ids, full_ids)
    if prompt_len < len(prompt_ids):
        # A template that renders the prompt alone differently, or tokens merging across the boundary
        logger.warning_once(
            "A tokenized prompt is not a prefix of its tokenized prompt + completion (the chat template renders "
            "the prompt alone differently, or tokens merge across the boundary). As in TRL's KTOTrainer, the "
            "completion starts where the two diverge and the rest of the prompt, "
            f"{tokenizer.decode(prompt_ids[prompt_len:])!r}, is not part of the training sequence, so the "
            "model learns from a context slightly unlike the one it is prompted with. End prompts on a token "
            "boundary, or use a template that renders the prompt alike in both cases. Shown once; it likely "
            "applies to many rows."
        )
    return {"prompt_ids": prompt_ids[:prompt_len], "completion_ids": full_ids[prompt_len:]}


def prepare_rewarded_dataset(
    dataset: Dataset | IterableDataset,
    tokenizer: PreTrainedTokenizerBase,
    args,
    name: str,
    *,
    scored_by_reward_funcs: bool = False,
) -> Dataset | IterableDataset:
    """Rows with a float `reward` (from the data, or later from `reward_funcs` when `scored_by_reward_funcs`),
    `prompt_ids` and `completion_ids` that fit in `args.max_length`, tokenized by [`tokenize_row`]; rows whose
    prompt alone fills `max_length` are dropped (with a warning), as `KTOTrainer` drops them. Every check names the
    column and the row. A streamed dataset is prepared lazily, as it streams; a prepared one is returned as it is."""
    if "prompt_ids" in get_dataset_column_names(dataset):  # already prepared, e.g. by a previous call
        return dataset
    num_proc = args.dataset_num_proc
    if scored_by_reward_funcs:
        if "reward" in get_dataset_column_names(dataset):
            raise ValueError(
                f"The {name} dataset has a 'reward' column and `reward_funcs` were given: pass one source of "
                "rewards (drop the column or the functions)."
            )
        # A `label` column stays as it is: the reward functions decide the rewards
        dataset = to_rewarded_dataset(dataset, requires_reward=False, name=name, num_proc=num_proc)
    else:
        dataset = to_rewarded_dataset(dataset, name=name, num_proc=num_proc)
    dataset = dataset.map(
        tokenize_row,
        fn_kwargs={"tokenizer": tokenizer},
        **map_kwargs(dataset, num_proc, f"Tokenizing {name} dataset"),
    )
    if args.max_length is not None:
        # Before anything counts or scores the rows: `reward_funcs` and the reference passes see the kept ones
        dataset = drop_long_prompts(dataset, args.max_length, name, num_proc)
        room = args.max_length
        dataset = dataset.map(
            lambda row: {"completion_ids": row["completion_ids"][: room - len(row["prompt_ids"])]},
            **map_kwargs(dataset, num_proc, f"Truncating {name} completions to max_length"),
        )
    return dataset
