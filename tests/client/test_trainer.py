"""LocalTrainer's default loss: the fused head path trains the plain path's adapter, keeping less."""

from __future__ import annotations

import torch

from fedtune.config import load_config
from tests.helpers.building import train_client_round
from tests.helpers.configs import TINY_OVERRIDES

# SGD: the adapters' difference stays at the loss's rounding (Adam would scale tiny entries' noise up)
SETTINGS = [*TINY_OVERRIDES, "training.optimizer=sgd", "training.lr=0.5", "training.local_steps=3"]
SETTINGS += ["data.max_seq_len=256"]  # answers of different lengths: the plain head runs past some


def _train(tmp_path, fused: bool):
    cfg = load_config(None, [*SETTINGS, f"training.fused_loss={str(fused).lower()}", f"output.dir={tmp_path}"])
    return train_client_round(cfg)


def test_fused_loss_trains_the_plain_adapter_without_keeping_logits(tmp_path):
    plain_bench, plain = _train(tmp_path / "plain", False)
    fused_bench, fused = _train(tmp_path / "fused", True)
    start = plain_bench.initial
    a, b = plain_bench.adapter.get_state(), fused_bench.adapter.get_state()
    update = torch.cat([(a[k] - start[k]).flatten() for k in a])
    gap = torch.cat([(a[k] - b[k]).flatten() for k in a])
    assert update.norm() > 0 and gap.norm() <= 1e-5 * update.norm()
    assert abs(fused.mean_loss - plain.mean_loss) <= 1e-6 * plain.mean_loss
    vocab = plain_bench.adapter.model.get_base_model().config.vocab_size
    assert plain.peak_activation_bytes - fused.peak_activation_bytes >= 4 * vocab * 4  # at least 4 positions' logits
    assert fused.flops < plain.flops  # the head runs at target positions only
