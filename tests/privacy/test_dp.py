import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune.aggregation.base import Contribution
from fedtune.aggregation.pipeline import Pipeline
from fedtune.aggregation.server_opt import Sgd
from fedtune.privacy.dp import AdaptiveClip, GaussianMean

SHAPES = {"a": (3, 4), "b": (5,)}


def _params():
    return {k: torch.zeros(s) for k, s in SHAPES.items()}


def _update(seed: int, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(s, generator=g) for k, s in SHAPES.items()}


def _norm(d):
    return math.sqrt(sum(float(v.pow(2).sum()) for v in d.values()))


def test_without_noise_or_clipping_it_is_the_plain_unweighted_mean():
    ups = [_update(i) for i in range(3)]
    mean = GaussianMean(0.0, 1e9, 3, seed=0)
    weighted = [Contribution(i, u, weight=10.0 * (i + 1)) for i, u in enumerate(ups)]
    out, state = mean.combine(_params(), weighted, mean.init())
    for k in SHAPES:
        assert torch.allclose(out[k], sum(u[k] for u in ups) / 3, atol=1e-6)  # weights ignored: each client counts once
    assert state.rounds == 1


@given(st.lists(st.floats(0.01, 1e4), min_size=1, max_size=5), st.floats(1e-3, 1e3), st.integers(0, 99))
@settings(max_examples=50, deadline=None)
def test_one_client_more_or_less_moves_the_sum_by_at_most_c(scales, c, seed):
    """The sensitivity the accountant assumes: add-or-remove of one client changes Σ clip(Δ_i, C) by <= C."""
    mean = GaussianMean(0.0, c, 1.0, seed=0)
    ups = [Contribution(i, _update(seed + i, s), 1.0) for i, s in enumerate(scales)]
    with_all, _ = mean.combine(_params(), ups, mean.init())
    without, _ = mean.combine(_params(), ups[:-1], mean.init())
    diff = {k: with_all[k] - without[k] for k in SHAPES}
    assert _norm(diff) <= c * (1 + 1e-5)


def test_the_denominator_is_fixed_so_a_dropped_client_adds_nothing():
    ups = [_update(i, 0.01) for i in range(4)]
    mean = GaussianMean(0.0, 10.0, 4, seed=0)
    two, _ = mean.combine(_params(), [Contribution(i, ups[i], 1.0) for i in (0, 2)], mean.init())
    for k in SHAPES:
        assert torch.allclose(two[k], (ups[0][k] + ups[2][k]) / 4, atol=1e-7)


def test_noise_has_std_z_c_over_d_and_never_repeats_across_rounds():
    params = {"w": torch.zeros(200, 200)}
    mean = GaussianMean(1.5, 2.0, 4, seed=7)
    state = mean.init()
    draws = []
    for _ in range(3):
        out, state = mean.combine(params, [], state)  # no client: noise alone
        draws.append(out["w"].flatten())
    for d in draws:
        assert d.std().item() == pytest.approx(1.5 * 2.0 / 4, rel=0.02) and abs(d.mean().item()) < 0.01
    assert abs(torch.corrcoef(torch.stack(draws))[0, 1].item()) < 0.02  # rounds draw independent noise
    again, _ = mean.combine(params, [], mean.init())
    assert torch.equal(again["w"].flatten(), draws[0])  # replayed from the state: resume is bit-identical
    other = GaussianMean(1.5, 2.0, 4, seed=8)
    assert not torch.equal(other.combine(params, [], other.init())[0]["w"].flatten(), draws[0])


@pytest.mark.parametrize("scale, direction", [(1e-3, -1), (1e3, 1)])
def test_adaptive_clipping_moves_c_towards_the_target_quantile(scale, direction):
    ups = [Contribution(i, _update(i, scale), 1.0) for i in range(20)]
    mean = GaussianMean(1.0, 1.0, 20, seed=0, adaptive=AdaptiveClip(target_quantile=0.5, lr=0.2, count_noise=1.0))
    state = mean.init()
    _, state = mean.combine(_params(), ups, state)
    share = 1.0 if direction < 0 else 0.0  # every update under C, or every one over it
    assert abs(state.unclipped - share) < 0.25  # noised with σ_b = 1 over 20 clients
    assert state.clip_norm == pytest.approx(math.exp(-0.2 * (state.unclipped - 0.5)))
    assert (state.clip_norm - 1.0) * direction > 0
    assert mean.update_z > 1.0  # the count's noise is paid for by more noise on the update


def test_dp_fedavg_is_the_pipeline_with_the_noised_mean_and_reports_only_noised_figures():
    agg = Pipeline("dp_fedavg", GaussianMean(0.5, 1.0, 2, seed=3), Sgd(1.0))
    params = {k: torch.ones(s) for k, s in SHAPES.items()}
    state = agg.init(params)
    assert agg.metrics(state) == {}
    ups = [Contribution(i, _update(i), 1.0) for i in range(2)]
    new, state = agg.aggregate(params, ups, state)
    delta, _ = agg.stage.combine(params, ups, agg.init(params).combine)
    for k in SHAPES:
        assert torch.equal(new[k], params[k] + delta[k])
    assert agg.metrics(state) == {"dp_clip_norm": 1.0, "dp_noise_std": 0.25}
    assert state.rounds == state.combine.rounds == 1


def test_a_sum_of_clipped_updates_enters_the_chain_as_the_updates_themselves_would():
    """Secure aggregation hands the pipeline only the sum: the same noise and step as the updates would get."""
    params = {k: torch.ones(s) for k, s in SHAPES.items()}
    ups = [Contribution(i, _update(i, 0.01), 1.0) for i in range(3)]  # all inside C: clipping changes nothing
    agg = Pipeline("dp_fedavg", GaussianMean(0.7, 1.0, 3, seed=5), Sgd(1.0))
    by_updates, s1 = agg.aggregate(params, ups, agg.init(params))
    total = {k: sum(u.delta[k] for u in ups) for k in SHAPES}
    by_sum, s2 = agg.aggregate_sum(params, total, len(ups), agg.init(params))
    for k in SHAPES:
        assert torch.allclose(by_sum[k], by_updates[k], atol=1e-6)
    assert s1.combine.rounds == s2.combine.rounds == 1
    noised, _ = agg.aggregate_sum(params, total, len(ups), agg.init(params), noised=True)  # clients added it
    for k in SHAPES:
        assert torch.allclose(noised[k], params[k] + total[k] / 3, atol=1e-6)
