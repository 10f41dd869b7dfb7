"""Shared fixtures: a tiny Qwen2 model with a character tokenizer, built once per test session."""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer Qwen2 (hidden 128) saved with ``save_pretrained``."""
    from vapo_pl.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_tied_model_dir(tmp_path_factory) -> Path:
    """Same as ``tiny_model_dir`` but with tied input/output embeddings."""
    from vapo_pl.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_tied") / "model", seed=1, tie_word_embeddings=True)
