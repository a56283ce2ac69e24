"""training.gradient_checkpointing: the same adapter, bit for bit, from a fraction of the kept activations."""

from __future__ import annotations

import pytest
import torch

from fedtune.client.cost import FlopModel
from fedtune.config import load_config
from fedtune.core.errors import ConfigError
from fedtune.models.activation_checkpointing import checkpoints_activations
from tests.helpers.building import train_client_round
from tests.helpers.configs import TINY_OVERRIDES

# dropout on: the recomputed forward must draw the masks the first one drew
SETTINGS = [*TINY_OVERRIDES, "adapter.dropout=0.2", "training.local_steps=3", "training.grad_accum=2"]


def _train(tmp_path, checkpointing: bool):
    cfg = load_config(
        "examples/quickstart.yaml",
        [*SETTINGS, f"training.gradient_checkpointing={str(checkpointing).lower()}", f"output.dir={tmp_path}"],
    )
    return train_client_round(cfg)


def test_checkpointing_trains_the_same_adapter_keeping_less_and_counts_the_rerun(tmp_path):
    plain_bench, plain = _train(tmp_path / "plain", False)
    ckpt_bench, ckpt = _train(tmp_path / "ckpt", True)
    assert checkpoints_activations(ckpt_bench.adapter.model.get_base_model())
    assert not checkpoints_activations(plain_bench.adapter.model.get_base_model())
    a, b = plain_bench.adapter.get_state(), ckpt_bench.adapter.get_state()
    start = plain_bench.initial
    assert any(not torch.equal(a[k], start[k]) for k in a)  # it trained
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical, dropout included
    assert ckpt.mean_loss == plain.mean_loss
    # the tiny model's 2 blocks keep only their inputs: the embeddings, the head's input and logits remain
    assert ckpt.peak_activation_bytes < 0.25 * plain.peak_activation_bytes
    # FLOPs: the blocks' forward once more per micro-batch, not the head's: 3 + 1 passes for the blocks
    cost = FlopModel.of_model(ckpt_bench.adapter.model)
    assert cost.recompute and not FlopModel.of_model(plain_bench.adapter.model).recompute
    assert plain.flops < ckpt.flops < 4 / 3 * plain.flops
    batch = {"input_ids": torch.zeros(4, 10, dtype=torch.long), "labels": torch.full((4, 10), 7)}
    again = cost.training(batch) - FlopModel.of_model(plain_bench.adapter.model).training(batch)
    assert again == cost.forward(range(len(cost.block_macs)), 4, 10) > 0


def test_checkpointing_with_split_or_dp_sgd_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="paradigm split does not support gradient checkpointing"):
        load_config(None, ["paradigm=split", "model.name=tiny-llama-deep", "training.gradient_checkpointing=true"])
    with pytest.raises(ConfigError, match="gradient_checkpointing does not combine with privacy.dp_sgd"):
        load_config(
            None,
            ["privacy.dp_sgd={noise_multiplier: 1.0, max_grad_norm: 1.0}", "training.gradient_checkpointing=true"],
        )
