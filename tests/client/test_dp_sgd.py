"""DP-SGD through Opacus on the tiny model's LoRA adapter: what one step computes, checked by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedtune.client.batching import poisson_batches
from fedtune.client.local_training import DpSgdStep, train_locally
from fedtune.config import load_config
from fedtune.losses import example_loss_sum
from tests.helpers.building import build
from tests.helpers.configs import TINY_OVERRIDES


@pytest.fixture(scope="module")
def adapter():
    return build(load_config("examples/tiny.yaml", TINY_OVERRIDES)).bench.adapter


def _batch(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 200, (n, 12), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _params(adapter):
    return list(adapter.params.values())


def _step(adapter, batch, noise: float, clip: float, expected: float) -> list[torch.Tensor]:
    """The change one DP-SGD step of plain SGD (lr 1) makes to every adapter tensor."""
    start = [p.detach().clone() for p in _params(adapter)]
    dp = DpSgdStep(noise, clip, expected, torch.Generator().manual_seed(0))
    train_locally(
        adapter.model, _params(adapter), [batch], 1, lambda s: 1.0, optimizer="sgd", loss=example_loss_sum, dp=dp
    )
    change = [p.detach() - s for p, s in zip(_params(adapter), start, strict=True)]
    with torch.no_grad():
        for p, s in zip(_params(adapter), start, strict=True):
            p.copy_(s)
    return change


def test_a_step_is_the_sum_of_per_example_gradients_each_clipped_over_the_expected_batch(adapter):
    batch = _batch(5, 0)
    clip, expected = 0.05, 4.0
    by_hand = [torch.zeros_like(p) for p in _params(adapter)]
    norms = []
    for i in range(5):  # one example at a time: its own mean loss, its own gradient, clipped
        one = {k: v[i : i + 1] for k, v in batch.items()}
        adapter.model.zero_grad(set_to_none=True)
        value, _ = example_loss_sum(adapter.model, one)
        value.backward()
        grads = [p.grad.detach().clone() for p in _params(adapter)]
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads)).item()
        norms.append(norm)
        for acc, g in zip(by_hand, grads, strict=True):
            acc.add_(g * min(1.0, clip / (norm + 1e-6)))
    adapter.model.zero_grad(set_to_none=True)
    assert min(norms) > clip  # every example clipped: the test sees clipping, not a plain mean
    change = _step(adapter, batch, 0.0, clip, expected)
    for c, h in zip(change, by_hand, strict=True):
        assert torch.allclose(c, -h / expected, atol=1e-6, rtol=1e-4)


def test_lora_weights_move_under_opacus_and_no_hooks_are_left(adapter):
    """The known pitfall: a wrapping order that leaves the adapter frozen. Every LoRA tensor must move."""
    change = _step(adapter, _batch(4, 1), 1.0, 1.0, 4.0)
    assert all(c.abs().max() > 0 for c in change)
    assert not any(m._forward_hooks or m._backward_hooks for m in adapter.model.modules())
    assert all(getattr(p, "grad_sample", None) is None for p in _params(adapter))


def test_an_empty_poisson_batch_is_a_step_of_noise_alone_with_std_sigma_c_over_b(adapter):
    empty = {k: torch.zeros((0, 1), dtype=torch.long) for k in ("input_ids", "attention_mask", "labels")}
    change = torch.cat([c.reshape(-1) for c in _step(adapter, empty, 2.0, 0.5, 4.0)])
    assert change.std().item() == pytest.approx(2.0 * 0.5 / 4.0, rel=0.1)


def test_poisson_batches_sample_each_example_at_the_rate():
    batches = poisson_batches(40, 4, 2000, np.random.default_rng(0))
    sizes = [len(b) for b in batches]
    assert abs(np.mean(sizes) - 4) < 0.2 and min(sizes) == 0 and max(sizes) > 8
    counts = np.bincount(np.concatenate(batches), minlength=40)
    assert counts.min() > 140 and counts.max() < 270  # each example in about 10% of the steps (200)
