import os

import pytest


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
