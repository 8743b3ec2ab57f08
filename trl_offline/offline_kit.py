"""Tiny models, a tokenizer and synthetic datasets that need no hub: the quickstart, the tests and the benchmarks
run on these.

`build_tiny_model` writes a model and its tokenizer to a folder and returns the path, which a user would pass where
they pass a hub id, so the loading code exercised is the real `from_pretrained` path.

Two tokenizers: `build_tokenizer`, one token per character (every split of a text is a token boundary, so prompt and
completion tokens never merge), and `build_bpe_tokenizer`, a byte-level BPE trained on the kit's own texts, whose
merges cross the prompt/completion boundary as real tokenizers' do and whose chat template also renders `tools` and an
`enable_thinking` flag, so tests see what reaches the template.

The data is a toy task with a known expert: the prompt is a short string of letters and the expert's completion is
the same letters sorted. `sort_reward` scores any completion against that expert, so later trainers and benchmarks
have a programmatic reward.
"""

import random
import string
import tempfile

from datasets import Dataset
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)


PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"  # end of an assistant turn, and so the eos token
SPECIAL_TOKENS = [PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, IM_START, IM_END]
CHARACTERS = string.printable  # letters, digits, punctuation and whitespace

# ChatML. The `{% generation %}` markers let TRL build assistant masks (`assistant_only_loss=True`); the end-of-turn
# token sits inside them so the model learns to stop.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


# The same ChatML, after a system turn listing the tools (as JSON) when `tools` are given and a system line when the
# `enable_thinking` template argument is true: with these, `tools` and `chat_template_kwargs` show in the tokens.
BPE_CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\nTools:' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- if enable_thinking %}{{- '<|im_start|>system\\nThink first.<|im_end|>\\n' }}{%- endif %}"
) + CHAT_TEMPLATE


def _as_transformers_tokenizer(tokenizer: Tokenizer, chat_template: str) -> PreTrainedTokenizerFast:
    """Both kit tokenizers share their special tokens (ChatML, eos = end of turn), pad and length."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=IM_END,
        additional_special_tokens=[IM_START],
        chat_template=chat_template,
        model_max_length=2048,
    )


def build_tokenizer(vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """A character-level tokenizer built with `tokenizers`: one token per printable character plus ChatML tokens.

    `vocab_size` pads the vocabulary with unused tokens, for benchmarks whose cost depends on the vocabulary size.
    """
    tokens = SPECIAL_TOKENS + list(CHARACTERS)
    if vocab_size is not None:
        if vocab_size < len(tokens):
            raise ValueError(f"`vocab_size` must be at least {len(tokens)}, got {vocab_size}.")
        tokens += [f"<unused_{i}>" for i in range(vocab_size - len(tokens))]
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return _as_transformers_tokenizer(tokenizer, CHAT_TEMPLATE)


BPE_VOCAB_SIZE = 400


def _bpe_corpus() -> list[str]:
    """What the BPE learns its merges from: the sorting task in every format the kit makes, rendered as the
    trainers see it (chat rows through the ChatML template, with and without tools)."""
    render = build_tokenizer()  # any tokenizer renders the template; only the text is used
    texts = []
    for dataset_format in DATASET_FORMATS:
        for row in make_dataset(dataset_format, num_rows=200, seed=1000):
            if "text" in row:
                texts.append(row["text"])
            elif "messages" in row:
                texts.append(render.apply_chat_template(row["messages"], tokenize=False))
            elif isinstance(row["prompt"], str):
                texts.append(row["prompt"] + row["completion"])
            else:
                texts.append(render.apply_chat_template(row["prompt"] + row["completion"], tokenize=False))
    for dataset_format in SCORED_FORMATS:
        for row in make_scored_dataset(dataset_format, num_rows=200, seed=1001, score="none"):
            if isinstance(row["prompt"], str):
                texts.append(row["prompt"] + row["completion"])
            else:
                messages = row["prompt"] + row["completion"]
                texts.append(render.apply_chat_template(messages, tokenize=False, chat_template=BPE_CHAT_TEMPLATE))
                texts.append(
                    render.apply_chat_template(
                        messages, tokenize=False, chat_template=BPE_CHAT_TEMPLATE, tools=[SORT_TOOL]
                    )
                )
    return texts


def build_bpe_tokenizer(vocab_size: int = BPE_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2's pre-tokenization) trained with `tokenizers` on the kit's sorting texts
    (`_bpe_corpus`), with the character tokenizer's special tokens (same ids), pad and eos, and `BPE_CHAT_TEMPLATE`.

    Merges such as `"abc"` span what a prompt ends with and a completion starts with (`"cab=ab"` + `"c"`), so the
    tokenized prompt is not always a prefix of the tokenized prompt + completion.

    Args:
        vocab_size: Size of the trained vocabulary: the 256 bytes, the special tokens and the merges. Training is
            deterministic, so the same size gives the same tokenizer.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        raise ValueError(f"`vocab_size` must be at least {len(alphabet) + len(SPECIAL_TOKENS)}, got {vocab_size}.")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet, show_progress=False
    )
    tokenizer.train_from_iterator(_bpe_corpus(), trainer=trainer)
    return _as_transformers_tokenizer(tokenizer, BPE_CHAT_TEMPLATE)


TOKENIZERS = ("char", "bpe")


def build_tiny_model(
    output_dir: str | None = None,
    *,
    architecture: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    tie_word_embeddings: bool = False,
    vocab_size: int | None = None,
    seed: int = 0,
    tokenizer: str = "char",
) -> str:
    """Build a randomly initialised causal LM with the kit's tokenizer, save both, and return the folder path.

    Args:
        output_dir: Where to save; a new temporary folder when `None`.
        architecture: `"llama"` or `"gpt2"`. (Not Qwen2: its `AutoTokenizer` mapping corrupts a character tokenizer.)
        hidden_size, num_layers, num_heads: Size of the transformer.
        tie_word_embeddings: Whether the LM head shares the input embedding matrix.
        vocab_size: With the character tokenizer, pad its vocabulary to this size (default: the characters and
            special tokens only); with the BPE, the size it is trained to (default `BPE_VOCAB_SIZE`).
        seed: Seed of the random initialisation.
        tokenizer: `"char"` (`build_tokenizer`) or `"bpe"` (`build_bpe_tokenizer`). The model's vocabulary is the
            tokenizer's length.
    """
    import torch

    if tokenizer == "char":
        tokenizer = build_tokenizer(vocab_size)
    elif tokenizer == "bpe":
        tokenizer = build_bpe_tokenizer(BPE_VOCAB_SIZE if vocab_size is None else vocab_size)
    else:
        raise ValueError(f"`tokenizer` must be one of {TOKENIZERS}, got {tokenizer!r}.")
    common = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    if architecture == "llama":
        model_class = LlamaForCausalLM
        config = LlamaConfig(
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            max_position_embeddings=1024,
            **common,
        )
    elif architecture == "gpt2":
        model_class = GPT2LMHeadModel
        config = GPT2Config(n_embd=hidden_size, n_layer=num_layers, n_head=num_heads, n_positions=1024, **common)
    else:
        raise ValueError(f"`architecture` must be 'llama' or 'gpt2', got {architecture!r}.")

    torch.manual_seed(seed)
    # The class itself, not `AutoModelForCausalLM.from_config`: under DeepSpeed ZeRO-3 the latter partitions the
    # weights with collectives, which deadlocks when only the main process builds the model
    model = model_class(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    output_dir = output_dir or tempfile.mkdtemp(prefix="trl_offline_tiny_")
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


# The toy task: sort the letters of the prompt.

SORT_ALPHABET = "abcdefgh"


def sort_prompt(rng: random.Random, min_len: int = 3, max_len: int = 6) -> str:
    return "".join(rng.choice(SORT_ALPHABET) for _ in range(rng.randint(min_len, max_len)))


def sort_reward(prompt: str, completion: str) -> float:
    """Fraction of positions where `completion` agrees with the sorted letters of `prompt` (length mismatches count
    as errors). 1.0 for the expert's answer."""
    target = "".join(sorted(prompt))
    matches = sum(a == b for a, b in zip(completion, target))
    return matches / max(len(target), len(completion))


DATASET_FORMATS = (
    "language_modeling",
    "prompt_completion",
    "conversational_language_modeling",
    "conversational_prompt_completion",
    "conversational_multi_turn",
)


def make_dataset(dataset_format: str, num_rows: int = 64, seed: int = 0) -> Dataset:
    """A synthetic sorting dataset in one of TRL's formats.

    - `"language_modeling"`: `text` (`"cab=abc"`).
    - `"prompt_completion"`: `prompt` (`"cab="`) and `completion` (`"abc"`).
    - `"conversational_language_modeling"`: `messages`, one user and one assistant turn.
    - `"conversational_prompt_completion"`: `prompt` and `completion` as lists of messages.
    - `"conversational_multi_turn"`: `messages` with two user/assistant exchanges, for `assistant_only_loss`.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        prompt = sort_prompt(rng)
        answer = "".join(sorted(prompt))
        if dataset_format == "language_modeling":
            rows.append({"text": f"{prompt}={answer}"})
        elif dataset_format == "prompt_completion":
            rows.append({"prompt": f"{prompt}=", "completion": answer})
        elif dataset_format == "conversational_language_modeling":
            rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
        elif dataset_format == "conversational_prompt_completion":
            rows.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "completion": [{"role": "assistant", "content": answer}],
                }
            )
        elif dataset_format == "conversational_multi_turn":
            second = sort_prompt(rng)
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": prompt},
                        {"role": "assistant", "content": answer},
                        {"role": "user", "content": second},
                        {"role": "assistant", "content": "".join(sorted(second))},
                    ]
                }
            )
        else:
            raise ValueError(f"Unknown dataset format {dataset_format!r}; expected one of {DATASET_FORMATS}.")
    return Dataset.from_list(rows)


# A tool in the JSON-schema form chat templates take, for data with a `tools` column
SORT_TOOL = {
    "type": "function",
    "function": {
        "name": "sort_letters",
        "description": "Sort the letters of a string.",
        "parameters": {"type": "object", "properties": {"letters": {"type": "string"}}, "required": ["letters"]},
    },
}


def sort_reward_func(prompts: list, completions: list, **kwargs) -> list[float]:
    """`sort_reward` with GRPO's reward-function signature, for standard or conversational rows."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [sort_reward(prompt_letters(p), t.strip()) for p, t in zip(prompts, texts)]


def change_one_letter(answer: str, rng: random.Random) -> str:
    """`answer` with one letter replaced by a different one."""
    position = rng.randrange(len(answer))
    return answer[:position] + rng.choice(SORT_ALPHABET.replace(answer[position], "")) + answer[position + 1 :]


ANSWER_KINDS = ("expert", "unsorted", "reversed", "changed")


def mixed_quality_answers(letters: str, rng: random.Random) -> tuple[str, str, str, str]:
    """Answers to a sorting prompt, one of each of `ANSWER_KINDS`: the expert's, the letters left unsorted, the sorted
    letters reversed, and the expert's with one letter changed."""
    expert = "".join(sorted(letters))
    return expert, letters, expert[::-1], change_one_letter(expert, rng)


SCORED_FORMATS = ("prompt_completion", "conversational_prompt_completion")


def make_scored_dataset(
    dataset_format: str = "conversational_prompt_completion", num_rows: int = 64, seed: int = 0, score: str = "reward"
) -> Dataset:
    """Sorting prompts with answers of mixed quality, as offline RL data: a quarter each of the expert's answer, the
    letters left unsorted, the sorted letters reversed, and the expert's answer with one letter changed.

    `score` is `"reward"` (a float `reward` column, `sort_reward` of the answer), `"label"` (KTO's bool `label`:
    True for the expert's answer) or `"none"` (no score; pass `sort_reward_func` as a reward function).
    """
    if dataset_format not in SCORED_FORMATS:
        raise ValueError(f"Unknown scored format {dataset_format!r}; expected one of {SCORED_FORMATS}.")
    if score not in ("reward", "label", "none"):
        raise ValueError(f"`score` must be 'reward', 'label' or 'none', got {score!r}.")
    rng = random.Random(seed)
    rows = []
    for i in range(num_rows):
        letters = sort_prompt(rng)
        expert = "".join(sorted(letters))
        answer = mixed_quality_answers(letters, rng)[i % 4]
        if dataset_format == "prompt_completion":
            row = {"prompt": f"{letters}=", "completion": answer}
        else:
            row = {
                "prompt": [{"role": "user", "content": letters}],
                "completion": [{"role": "assistant", "content": answer}],
            }
        if score == "reward":
            row["reward"] = sort_reward(letters, answer)
        elif score == "label":
            row["label"] = answer == expert
        rows.append(row)
    return Dataset.from_list(rows)


# Names that recipes accept in place of a hub id, so the tiny configs run on a machine with no hub access.

KIT_PREFIX = "offline_kit:"


def is_kit_name(name: str | None) -> bool:
    return bool(name) and name.startswith(KIT_PREFIX)


def resolve_kit_model(name: str, root: str) -> str:
    """`offline_kit:llama` or `offline_kit:gpt2` -> the path of that tiny model, built under `root` if missing."""
    import os

    architecture = name.removeprefix(KIT_PREFIX)
    path = os.path.join(root, f"offline-kit-{architecture}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        build_tiny_model(path, architecture=architecture)
    return path


def load_kit_dataset(name: str, num_train_rows: int = 512, num_test_rows: int = 64):
    """`offline_kit:<format>` -> a `DatasetDict` with `train` and `test` splits of the sorting task;
    `offline_kit:scored_<format>` and `offline_kit:labelled_<format>` -> answers of mixed quality with a `reward`,
    or with KTO's `label` (see `make_scored_dataset`)."""
    from datasets import DatasetDict

    dataset_format = name.removeprefix(KIT_PREFIX)
    for prefix, score in (("scored_", "reward"), ("labelled_", "label")):
        if dataset_format.startswith(prefix):
            dataset_format = dataset_format.removeprefix(prefix)
            return DatasetDict(
                train=make_scored_dataset(dataset_format, num_train_rows, seed=0, score=score),
                test=make_scored_dataset(dataset_format, num_test_rows, seed=1, score=score),
            )
    return DatasetDict(
        train=make_dataset(dataset_format, num_train_rows, seed=0),
        test=make_dataset(dataset_format, num_test_rows, seed=1),
    )


# Evaluation on the sorting task: greedy answers to held-out prompts, scored by `sort_reward`.


def greedy_completions(model, tokenizer, prompts: list, max_new_tokens: int = 12, batch_size: int = 64) -> list[str]:
    """Greedy completions for `prompts` (strings, or lists of messages rendered with the chat template)."""
    import torch

    texts = [
        p if isinstance(p, str) else tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    was_training = model.training
    model.eval()
    completions = []
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True).to(model.device)
            with torch.no_grad():
                out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
            completions += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return [c.strip() for c in completions]


def prompt_letters(prompt) -> str:
    """The letters to sort, from a prompt in any of the kit's formats."""
    text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
    return text.removesuffix("=")


def mean_sort_reward(model, tokenizer, prompts: list) -> float:
    completions = greedy_completions(model, tokenizer, prompts)
    return sum(sort_reward(prompt_letters(p), c) for p, c in zip(prompts, completions)) / len(prompts)
