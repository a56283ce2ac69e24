"""Shared fixtures: an isolated model cache and the tiny random Llama (helpers live in tests/helpers/)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedtune.models.loading import cache_dir

if "FEDTUNE_CACHE" not in os.environ:  # keep tests off the user's cache, but share across sessions
    os.environ["FEDTUNE_CACHE"] = str(Path(__file__).resolve().parent.parent / ".cache" / "fedtune-tests")


@pytest.fixture
def tiny():
    """A fresh tiny random Llama + tokenizer (LoadedModel), through the real loading path."""
    from fedtune.models.loading import load_model

    return load_model("tiny-llama")


@pytest.fixture
def tiny_adapter(tiny):
    """The tiny model with a LoRA adapter on q/v."""
    from fedtune.adapters.adapter_model import AdapterModel
    from fedtune.config import AdapterConfig

    return AdapterModel(tiny.model, AdapterConfig(r=4, target_modules=["q_proj", "v_proj"]), seed=0)


@pytest.fixture(scope="session")
def model_cache() -> Path:
    return cache_dir()
