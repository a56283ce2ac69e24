"""A minority of bad clients: robust combiners stay near the honest mean, FedAvg does not."""

from __future__ import annotations

import pytest
import torch

from fedtune.aggregation import Contribution, build_aggregator
from fedtune.aggregation.clipping import clip_update, update_norm

HONEST, BAD = 7, 3


def _federation(attack: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    center = {"a": torch.randn(8, 32, generator=g) * 0.05, "b": torch.randn(32, 8, generator=g) * 0.05}
    honest = [{k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in center.items()} for _ in range(HONEST)]
    mean = {k: sum(h[k] for h in honest) / HONEST for k in center}
    if attack == "scaled":
        bad = [{k: 100.0 * v for k, v in honest[i].items()} for i in range(BAD)]
    else:  # sign-flipped and amplified
        bad = [{k: -10.0 * v for k, v in honest[i].items()} for i in range(BAD)]
    contribs = [Contribution(i, d, 1.0) for i, d in enumerate(honest + bad)]
    return contribs, mean


def _distance(x, y):
    return update_norm({k: x[k] - y[k] for k in x})


@pytest.mark.parametrize("attack", ["scaled", "sign_flip"])
@pytest.mark.parametrize(
    "robust",
    [
        dict(combine="median"),
        dict(combine="trimmed_mean", trim_fraction=0.3),
        dict(combine="krum", byzantine=3),
        dict(combine="krum", byzantine=3, krum_select=4),
    ],
    ids=["median", "trimmed_mean", "krum", "multi_krum"],
)
def test_robust_combiners_resist_a_bad_minority(attack, robust):
    contribs, honest_mean = _federation(attack)
    zero = {k: torch.zeros_like(v) for k, v in honest_mean.items()}
    scale = update_norm(honest_mean)
    plain = build_aggregator(name="fedavg")
    naive, _ = plain.aggregate(zero, contribs, plain.init(zero))
    agg = build_aggregator(name="fedavg", **robust)
    got, _ = agg.aggregate(zero, contribs, agg.init(zero))
    assert _distance(naive, honest_mean) > 2.0 * scale  # FedAvg is dragged far away
    assert _distance(got, honest_mean) < 0.25 * scale


def test_clipping_before_the_mean_bounds_scaled_attacks():
    contribs, honest_mean = _federation("scaled")
    zero = {k: torch.zeros_like(v) for k, v in honest_mean.items()}
    scale = update_norm(honest_mean)
    agg = build_aggregator(name="fedavg", clip_norm=1.5 * scale)  # above every honest norm
    got, _ = agg.aggregate(zero, contribs, agg.init(zero))
    assert _distance(got, honest_mean) < 0.25 * scale


def test_clipping_scales_long_updates_only():
    long, short = {"x": torch.full((4,), 3.0)}, {"x": torch.full((4,), 0.1)}
    assert update_norm(clip_update(long, 1.0)) == pytest.approx(1.0)
    assert clip_update(short, 1.0) is short
    assert torch.allclose(clip_update(long, 1.0)["x"] / long["x"], torch.full((4,), 1 / 6))


@pytest.mark.parametrize("k", [1, 2, 3, 4, 7, 10])
def test_median_matches_the_sorted_definition(k):
    x = torch.randn(k, 50, generator=torch.Generator().manual_seed(k))
    got = build_aggregator(combine="median").combine([Contribution(i, {"w": x[i]}, 1.0) for i in range(k)])["w"]
    s = x.sort(dim=0).values
    ref = s[(k - 1) // 2] if k % 2 else 0.5 * (s[k // 2 - 1] + s[k // 2])
    assert torch.equal(got, ref)


@pytest.fixture(params=[None, 7], ids=["one block", "blocks of 7 values"])
def blocks(request, monkeypatch):
    """The combiners gather coordinates in cache-sized blocks: tiny blocks put boundaries everywhere."""
    if request.param is not None:
        monkeypatch.setattr("fedtune.aggregation.combine._BLOCK_VALUES", request.param)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 7, 10])
def test_median_matches_the_sorted_definition_across_blocks(k, blocks):
    x = torch.randn(k, 5, 11, generator=torch.Generator().manual_seed(k))  # 55 values: not a multiple of a block
    got = build_aggregator(combine="median").combine([Contribution(i, {"w": x[i]}, 1.0) for i in range(k)])["w"]
    s = x.sort(dim=0).values
    ref = s[(k - 1) // 2] if k % 2 else 0.5 * (s[k // 2 - 1] + s[k // 2])
    assert got.shape == (5, 11) and torch.equal(got, ref)


@pytest.mark.parametrize(("k", "beta"), [(1, 0.1), (5, 0.1), (5, 0.2), (10, 0.3), (9, 0.45)])
def test_trimmed_mean_matches_the_sorted_definition_across_blocks(k, beta, blocks):
    x = torch.randn(k, 3, 19, generator=torch.Generator().manual_seed(k))
    got = build_aggregator(combine="trimmed_mean", trim_fraction=beta).combine(
        [Contribution(i, {"w": x[i]}, 1.0) for i in range(k)]
    )["w"]
    cut = int(beta * k)
    ref = x.sort(dim=0).values[cut : k - cut].mean(dim=0)
    assert got.shape == (3, 19) and torch.allclose(got, ref, rtol=1e-6, atol=1e-7)


def test_a_huge_outlier_trimmed_away_leaves_every_honest_digit(blocks):
    """The middle values are selected, not recovered as total − extremes (1e30 would cancel them all)."""
    honest = torch.tensor([[1e-3, -2e-3, 3e-3], [2e-3, 1e-3, -1e-3], [3e-3, 5e-3, 2e-3], [-1e-3, 0.0, 4e-3]])
    bad = torch.full((1, 3), 1e30)
    x = torch.cat([honest, bad])  # (5, 3)
    got = build_aggregator(combine="trimmed_mean", trim_fraction=0.2).combine(
        [Contribution(i, {"w": x[i]}, 1.0) for i in range(5)]
    )["w"]
    ref = x.sort(dim=0).values[1:4].mean(dim=0)  # cut 1 each end: the bad value and the smallest honest one
    assert ref.abs().max() < 1e-2
    assert torch.allclose(got, ref, rtol=1e-6, atol=0)


def test_half_precision_updates_are_combined_in_float32_and_returned_in_their_dtype(blocks):
    x = torch.randn(4, 9, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    for combine in ("median", "trimmed_mean"):
        got = build_aggregator(combine=combine).combine([Contribution(i, {"w": x[i]}, 1.0) for i in range(4)])["w"]
        assert got.dtype == torch.bfloat16
    s = x.float().sort(dim=0).values
    median = build_aggregator(combine="median").combine([Contribution(i, {"w": x[i]}, 1.0) for i in range(4)])["w"]
    assert torch.equal(median, (0.5 * (s[1] + s[2])).to(torch.bfloat16))
