import os

import pytest
from helpers import pretrain_tiny_model


# No machine here reaches a hub; make any accidental call fail fast instead of hanging, and keep telemetry off.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """A tiny Llama and the kit's tokenizer, saved to a folder: tests pass the path as a user passes a hub id."""
    from trl_offline.offline_kit import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def tiny_tied_model_path(tmp_path_factory):
    from trl_offline.offline_kit import build_tiny_model

    return build_tiny_model(
        str(tmp_path_factory.mktemp("tiny-gpt2-tied")), architecture="gpt2", tie_word_embeddings=True
    )


@pytest.fixture(scope="session")
def pretrained_tiny_model_path(tmp_path_factory):
    """The tiny Llama with the character tokenizer, pretrained (`pretrain_tiny_model`): its greedy answers are often
    partly right, so their rewards, values and advantages vary from prompt to prompt."""
    return pretrain_tiny_model(tmp_path_factory.mktemp("pretrained-tiny-llama"))


@pytest.fixture(scope="session")
def pretrained_tiny_bpe_model_path(tmp_path_factory):
    """The same pretrained start with the kit's byte-level BPE tokenizer."""
    return pretrain_tiny_model(tmp_path_factory.mktemp("pretrained-tiny-llama-bpe"), "bpe")


def _save_tiny_model(path: str, model_class, config_class, tokenizer=None, **config) -> str:
    """A small `model_class` (1-2 layers, hidden 32) with `tokenizer` (the kit's character tokenizer by default), seeded,
    saved to `path` as a user's checkpoint is; `config` adds to the sizes."""
    import torch

    from trl_offline.offline_kit import build_tokenizer

    tokenizer = tokenizer or build_tokenizer()
    sizes = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2)
    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    config = config_class(**sizes, **config, **ids)
    torch.manual_seed(0)
    model_class(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def reward_model_path(tmp_path_factory):
    """A tiny Llama sequence classifier and the kit's tokenizer, saved to a folder as a user's reward model is."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    path = str(tmp_path_factory.mktemp("tiny-reward-model"))
    return _save_tiny_model(path, LlamaForSequenceClassification, LlamaConfig, num_hidden_layers=1, num_labels=1)


def _save_tiny_moe_model(path: str, tokenizer=None) -> str:
    from transformers import MixtralConfig, MixtralForCausalLM

    return _save_tiny_model(
        path,
        MixtralForCausalLM,
        MixtralConfig,
        tokenizer,
        num_hidden_layers=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        router_aux_loss_coef=0.02,
    )


@pytest.fixture(scope="session")
def tiny_moe_model_path(tmp_path_factory):
    """A tiny Mixtral (4 experts, 2 per token, `router_aux_loss_coef` 0.02) with the kit's tokenizer, saved as a user's
    Mixture-of-Experts checkpoint is."""
    return _save_tiny_moe_model(str(tmp_path_factory.mktemp("tiny-mixtral")))


@pytest.fixture(scope="session")
def tiny_moe_bpe_model_path(tmp_path_factory):
    """The tiny Mixtral with the kit's byte-level BPE tokenizer, whose chat template renders `tools`."""
    from trl_offline.offline_kit import build_bpe_tokenizer

    return _save_tiny_moe_model(str(tmp_path_factory.mktemp("tiny-mixtral-bpe")), build_bpe_tokenizer())


@pytest.fixture(scope="session")
def tiny_bpe_model_path(tmp_path_factory):
    """A tiny Llama with the kit's byte-level BPE tokenizer (merges that cross the prompt/completion boundary, a chat
    template that renders `tools` and `enable_thinking`), saved to a folder."""
    from trl_offline.offline_kit import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("tiny-llama-bpe")), tokenizer="bpe")
