"""Hierarchical aggregation: two levels of FedAvg are the flat FedAvg; edges use their own aggregator and codec."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune.aggregation import Contribution, Hierarchy, build_aggregator, fedavg
from fedtune.aggregation.hierarchy import edge_of
from fedtune.config import AggregationConfig
from fedtune.server.checkpoint import state_from_tensors, state_to_tensors
from fedtune.wire.serialize import encode


def _tensors(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": scale * torch.randn(40, 30, generator=g), "b.bias": scale * torch.randn(30, generator=g)}


def _two_level(edges: int, n: int, **edge_fields) -> Hierarchy:
    cfg = AggregationConfig(edges=edges, **edge_fields)
    agg = build_aggregator(cfg, num_clients=n)
    assert isinstance(agg, Hierarchy)
    return agg


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 12),
    edges=st.integers(1, 6),
    sampled=st.data(),
    weights=st.lists(st.floats(0.5, 500.0), min_size=12, max_size=12),
)
def test_fedavg_of_edge_fedavgs_is_the_flat_fedavg(n, edges, sampled, weights):
    edges = min(edges, n)
    clients = sampled.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))
    params = _tensors(100)
    contributions = [Contribution(c, _tensors(c), weights[c]) for c in clients]
    flat, _ = fedavg().aggregate(params, contributions, fedavg().init(params))
    agg = _two_level(edges, n)
    two, state = agg.aggregate(params, contributions, agg.init(params))
    assert all(torch.allclose(two[k], flat[k], rtol=1e-5, atol=1e-5) for k in flat)
    assert state.edges_used == len({edge_of(c, edges, n) for c in clients})


def test_edges_are_contiguous_blocks_of_client_ids():
    assert [edge_of(c, 3, 7) for c in range(7)] == [0, 0, 0, 1, 1, 2, 2]
    assert [edge_of(c, 1, 4) for c in range(4)] == [0, 0, 0, 0]


def test_each_edge_aggregates_with_its_own_aggregator_and_codec_and_its_bytes_are_counted():
    params = {k: torch.zeros_like(v) for k, v in _tensors(0).items()}
    # 6 clients: edge 0 holds 0, 1, 2 (2 honest, 1 far out), edge 1 holds 3 (of 3, 4, 5)
    deltas = [_tensors(1, 0.01), _tensors(2, 0.01), _tensors(3, 100.0), _tensors(4, 0.01)]
    contributions = [Contribution(c, d, 1.0) for c, d in enumerate(deltas)]
    median = _two_level(2, 6, edge={"combine": "median"})
    out, state = median.aggregate(params, contributions, median.init(params))
    edge0 = {k: torch.stack([d[k] for d in deltas[:3]]).median(dim=0).values for k in params}
    expected = {k: (3 * edge0[k] + deltas[3][k]) / 4 for k in params}  # the server: FedAvg, weights 3 and 1
    assert all(torch.allclose(out[k], expected[k], atol=1e-6) for k in params)
    assert float(max(v.abs().max() for v in out.values())) < 1.0  # the outlier stopped at its edge
    plain_up = state.edge_bytes_up
    assert plain_up == 2 * len(encode(median.uplink.encode(params, {}, torch.Generator())[0]))
    assert state.edge_bytes_down == 2 * len(encode(params))
    int8 = _two_level(2, 6, edge={"combine": "median"}, edge_uplink=[{"name": "int8"}])
    out8, state8 = int8.aggregate(params, contributions, int8.init(params))
    assert state8.edge_bytes_up < plain_up / 2
    assert all(torch.allclose(out8[k], out[k], atol=1e-2) for k in out)


def test_edge_state_survives_a_checkpoint_and_edges_without_clients_keep_theirs():
    agg = _two_level(2, 4, edge={"name": "fedavgm"})
    params = _tensors(0)
    _, state = agg.aggregate(params, [Contribution(0, _tensors(1, 0.1), 1.0)], agg.init(params))
    assert state.edges_used == 1 and state.rounds == 1
    tensors, scalars = state_to_tensors(state)
    back = state_from_tensors(agg.init(params), tensors, scalars)
    assert back.rounds == 1 and back.edge_bytes_up == state.edge_bytes_up
    momentum = [t for k, t in tensors.items() if k.startswith("edges.edge0.")]
    assert momentum and any(t.abs().sum() > 0 for t in momentum)  # edge 0's server momentum moved
    assert all(t.abs().sum() == 0 for k, t in tensors.items() if k.startswith("edges.edge1."))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"edge": {"combine": "median"}}, "edges > 0"),
        ({"edge_uplink": [{"name": "int8"}]}, "edges > 0"),
        ({"edges": 2, "scaffold": True}, "SCAFFOLD"),
        ({"edges": 2, "edge": {"edges": 3}}, "takes the aggregation keys"),
        ({"edges": 2, "edge": {"combine": "nonsense"}}, "combine"),
    ],
)
def test_settings_edges_cannot_take_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        AggregationConfig(**fields)


def test_more_edges_than_clients_is_refused():
    with pytest.raises(ValueError, match="at least as many clients"):
        build_aggregator(AggregationConfig(edges=5), num_clients=4)


def test_a_two_level_run_gives_the_flat_runs_model_with_bytes_per_link(tmp_path):
    from safetensors.torch import load_file

    from tests.helpers.cli import read_metrics, run_tiny

    common = ["aggregation.lora=naive", "evaluation.exact_match=false"]  # FedAvg over the factors: linear
    for name, extra in {"flat": [], "edges": ["aggregation.edges=2"]}.items():
        code, out = run_tiny(tmp_path, *common, *extra, name=name)
        assert code == 0, out
    adapter = "final_adapter/adapter_model.safetensors"
    flat, two = load_file(tmp_path / "flat" / adapter), load_file(tmp_path / "edges" / adapter)
    # float32 sums in another order: the rounding (1e-7 a round) feeds back through training: 2e-5 after 3
    assert all(torch.allclose(two[k], flat[k], atol=1e-4, rtol=0) for k in flat)
    for row in read_metrics(tmp_path / "edges")[1:]:  # 4 clients -> 2 edges: half the updates reach the server
        assert row["edges_used"] == 2 and 0.4 < row["edge_bytes_up"] / row["bytes_up"] < 0.6
        assert row["edge_bytes_down"] > 0
    secure = ["aggregation.edges=2", "privacy.secure_aggregation={}", "aggregation.lora=ffa"]
    code, out = run_tiny(tmp_path, "evaluation.exact_match=false", *secure, name="secure")
    assert code != 0 and "takes a sum" in out
