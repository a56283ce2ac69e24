"""Aggregation identities, table-driven over every server optimizer x combiner."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from fedtune.aggregation import AGGREGATORS, COMBINERS, Contribution, build_aggregator, fedavg
from fedtune.aggregation.weighting import WeightCap, client_weight
from fedtune.server.checkpoint import state_from_tensors, state_to_tensors

ALL = [(n, c) for n in AGGREGATORS for c in COMBINERS]
EXACT_ONE_ROUND = {"fedavg", "fedavgm"}  # η = 1 and zero initial momentum: round one returns the combined update


def _params(seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {
        "m.lora_A.weight": scale * torch.randn(4, 16, generator=g),
        "m.lora_B.weight": scale * torch.randn(16, 4, generator=g),
    }


def _close(x, y, atol=1e-6):
    return all(torch.allclose(x[k], y[k], atol=atol, rtol=0) for k in x)


def _agg(name, combine, **kw):
    return build_aggregator(name=name, combine=combine, **kw)


@pytest.mark.parametrize("name", sorted(EXACT_ONE_ROUND))
@pytest.mark.parametrize("combine", ["mean", "median", "trimmed_mean"])
def test_one_client_gives_that_client(name, combine):
    agg = _agg(name, combine)
    glob, client = _params(0), _params(1)
    delta = {k: client[k] - glob[k] for k in glob}
    new, _ = agg.aggregate(glob, [Contribution(5, delta, 1.0)], agg.init(glob))
    assert _close(new, client)


@pytest.mark.parametrize("name", sorted(EXACT_ONE_ROUND))
@pytest.mark.parametrize("combine", COMBINERS)
def test_identical_clients_give_that_client(name, combine):
    agg = _agg(name, combine)
    glob, client = _params(0), _params(1)
    delta = {k: client[k] - glob[k] for k in glob}
    contribs = [Contribution(i, delta, w) for i, w in enumerate([3.0, 1.0, 7.0, 2.0])]
    new, _ = agg.aggregate(glob, contribs, agg.init(glob))
    assert _close(new, client)


@pytest.mark.parametrize("name, combine", ALL)
def test_client_order_does_not_matter_bitwise(name, combine):
    agg = _agg(name, combine)
    glob = _params(0)
    contribs = [Contribution(i, _params(i + 1, 0.1), float(i + 1)) for i in range(4)]
    results = [agg.aggregate(glob, list(p), agg.init(glob))[0] for p in itertools.permutations(contribs)]
    assert all(torch.equal(r[k], results[0][k]) for r in results for k in r)


@pytest.mark.parametrize("name, combine", ALL)
def test_state_round_trips_and_rounds_count(name, combine):
    agg = _agg(name, combine)
    glob = _params(0)
    state = agg.init(glob)
    for r in range(2):
        contribs = [Contribution(i, _params(10 * r + i, 0.1), 1.0) for i in range(4)]
        glob, state = agg.aggregate(glob, contribs, state)
    tensors, scalars = state_to_tensors(state)
    back = state_from_tensors(agg.init(glob), tensors, scalars)
    assert state.rounds == 2 and back.rounds == 2
    assert all(torch.equal(a, b) for a, b in zip(state_to_tensors(back)[0].values(), tensors.values(), strict=True))


def test_fedavg_is_the_weighted_mean_of_client_params():
    agg = fedavg()
    glob = _params(0)
    clients = [_params(s) for s in (1, 2, 3)]
    weights = [10.0, 30.0, 60.0]
    contribs = [
        Contribution(i, {k: c[k] - glob[k] for k in glob}, w)
        for i, (c, w) in enumerate(zip(clients, weights, strict=True))
    ]
    new, state = agg.aggregate(glob, contribs, agg.init(glob))
    expected = {k: sum(w * c[k] for c, w in zip(clients, weights, strict=True)) / 100.0 for k in glob}
    assert _close(new, expected, atol=1e-5)
    assert state.rounds == 1


def _reference_fedopt(rule, deltas, lr=0.1, b1=0.9, b2=0.99, tau=1e-3, bias=False):
    """Reddi et al. 2021, Algorithm 2, written out on one tensor."""
    x = torch.zeros_like(deltas[0])
    m, v = torch.zeros_like(x), torch.full_like(x, tau**2)
    for t, d in enumerate(deltas, 1):
        m = b1 * m + (1 - b1) * d
        if rule == "adam":
            v = b2 * v + (1 - b2) * d * d
        elif rule == "yogi":
            v = v - (1 - b2) * d * d * torch.sign(v - d * d)
        else:
            v = v + d * d
        mh = m / (1 - b1**t) if bias else m
        vh = v / (1 - b2**t) if bias and rule != "adagrad" else v
        x = x + lr * mh / (vh.sqrt() + tau)
    return x


@pytest.mark.parametrize("rule", ["adam", "yogi", "adagrad"])
@pytest.mark.parametrize("bias", [False, True])
def test_fedopt_matches_the_paper(rule, bias):
    agg = build_aggregator(name=f"fed{rule}", server_lr=0.1, bias_correction=bias)
    glob = {"w": torch.zeros(50)}
    state = agg.init(glob)
    g = torch.Generator().manual_seed(0)
    deltas = [torch.randn(50, generator=g) * 0.01 for _ in range(4)]
    for d in deltas:  # two identical clients: the pseudo-gradient is d itself
        glob, state = agg.aggregate(glob, [Contribution(0, {"w": d}, 1.0), Contribution(1, {"w": d}, 2.0)], state)
    assert torch.allclose(glob["w"], _reference_fedopt(rule, deltas, bias=bias), atol=1e-6)


def test_fedavgm_accumulates_momentum():
    agg = build_aggregator(name="fedavgm", momentum=0.5, server_lr=2.0)
    glob = {"w": torch.zeros(3)}
    state = agg.init(glob)
    for _ in range(2):
        glob, state = agg.aggregate(glob, [Contribution(0, {"w": torch.ones(3)}, 1.0)], state)
    # v1 = 1, w1 = 2; v2 = 0.5 + 1 = 1.5, w2 = 2 + 3 = 5
    assert torch.allclose(glob["w"], torch.full((3,), 5.0))


def test_bad_weights_rejected():
    agg = fedavg()
    glob = _params(0)
    with pytest.raises(ValueError, match="positive"):
        agg.aggregate(glob, [Contribution(0, glob, 0.0)], agg.init(glob))
    with pytest.raises(ValueError, match="zero contributions"):
        agg.aggregate(glob, [], agg.init(glob))


def test_krum_needs_enough_clients():
    agg = build_aggregator(combine="krum", byzantine=1)
    glob = _params(0)
    with pytest.raises(ValueError, match=r"Krum needs K > f \+ 2"):
        agg.aggregate(glob, [Contribution(i, glob, 1.0) for i in range(3)], agg.init(glob))


@pytest.mark.parametrize("scheme, expected", [("examples", 12.0), ("tokens", 345.0), ("uniform", 1.0)])
def test_weighting(scheme, expected):
    assert client_weight(12, 345, scheme) == expected


@pytest.mark.parametrize("examples", [0, -3, float("inf"), float("nan")])
def test_a_weight_must_be_positive_and_finite(examples):
    with pytest.raises(ValueError, match="positive number"):
        client_weight(examples, 10, "examples")


@pytest.mark.parametrize(
    ("examples", "tokens", "scheme", "expected"),
    [
        (50, 900, "examples", 50.0),
        (51, 900, "examples", 50.0),
        (1e30, 900, "examples", 50.0),
        (50, 6400, "tokens", 6400.0),
        (1, 6401, "tokens", 6400.0),
        (1e30, 1e30, "uniform", 1.0),
    ],
)
def test_a_weight_counts_at_most_what_a_clients_data_could_give(examples, tokens, scheme, expected, caplog):
    cap = WeightCap(max_examples=50, max_seq_len=128)  # tokens: at most 50 * 128 = 6400
    assert client_weight(examples, tokens, scheme, cap, "client 3") == expected
    reported = {"examples": examples, "tokens": tokens, "uniform": 1.0}[scheme]
    assert ("client 3 reported" in caplog.text) == (expected < reported)


def test_scaffold_server_control_update_and_broadcast():
    agg = build_aggregator(name="fedavg", scaffold=True, num_clients=10)
    glob = {"w": torch.zeros(2)}
    state = agg.init(glob)
    assert torch.equal(agg.broadcast(state)["scaffold"]["w"], torch.zeros(2))
    contribs = [
        Contribution(i, {"w": torch.ones(2)}, 1.0, {"scaffold": {"w": torch.full((2,), float(i + 1))}})
        for i in range(4)
    ]
    new, state = agg.aggregate(glob, contribs, state)
    # c <- c + (|S|/N) mean(dc) = (4/10) * 2.5 = 1.0; x follows the inner FedAvg
    assert torch.allclose(agg.broadcast(state)["scaffold"]["w"], torch.full((2,), 1.0))
    assert torch.equal(new["w"], torch.ones(2)) and state.rounds == 1


def test_scaffold_needs_the_federation_size():
    with pytest.raises(ValueError, match="num_clients"):
        build_aggregator(scaffold=True)


LORA = {
    "lora_exact": dict(name="fedavg", lora="exact"),
    "lora_naive_fedavg": dict(name="fedavg", lora="naive"),
    "lora_naive_fedadam": dict(name="fedadam", lora="naive"),
    "lora_flexlora_mixed": dict(name="fedavg", lora="exact", client_ranks={0: 2, 1: 2}),
    "lora_hetlora_mixed": dict(name="fedavg", lora="naive", client_ranks={0: 2, 1: 2}),
}


def _lora_agg(spec):
    spec = dict(spec)
    ranks = spec.pop("client_ranks", None)
    return build_aggregator(lora_alpha=8.0, client_ranks=ranks, **spec)


def _lora_contribs(agg, glob, state, seeds):
    out = []
    for cid, seed in enumerate(seeds):
        view = agg.client_view(glob, state, cid)
        g = torch.Generator().manual_seed(seed)
        out.append(Contribution(cid, {k: 0.1 * torch.randn(v.shape, generator=g) for k, v in view.items()}, 1.0 + cid))
    return out


@pytest.mark.parametrize("spec", list(LORA.values()), ids=list(LORA))
def test_lora_aggregators_ignore_client_order_bitwise(spec):
    agg = _lora_agg(spec)
    glob = _params(0)
    state = agg.init(glob)
    contribs = _lora_contribs(agg, glob, state, [1, 2, 3, 4])
    results = [agg.aggregate(glob, list(p), state)[0] for p in itertools.permutations(contribs)]
    assert all(torch.equal(r[k], results[0][k]) for r in results for k in r)


@pytest.mark.parametrize("spec", [LORA["lora_exact"], LORA["lora_naive_fedavg"]], ids=["exact", "naive"])
def test_lora_identical_clients_give_that_product(spec):
    agg = _lora_agg(spec)
    glob = _params(0)
    state = agg.init(glob)
    same = _lora_contribs(agg, glob, state, [5])[0].delta
    new, state = agg.aggregate(glob, [Contribution(i, same, 1.0 + i) for i in range(3)], state)
    client = {k: glob[k] + same[k] for k in glob}
    prod = lambda p: p["m.lora_B.weight"] @ p["m.lora_A.weight"]  # noqa: E731
    assert torch.allclose(prod(new), prod(client), atol=1e-4)
    assert max(v for k, v in agg.metrics(state).items() if not k.endswith("_abs")) < 1e-5


@pytest.mark.parametrize(
    "split",
    [
        lambda flat: dict(zip("abc", torch.split(flat, [3, 5, 4]), strict=True)),  # tiles: one kernel
        lambda flat: {"a": flat[:3], "c": flat[8:]},  # a gap: per tensor
        lambda flat: {"a": flat[:6], "b": flat[3:9]},  # an overlap: per tensor
        lambda flat: {"a": flat[:8].reshape(2, 4).t(), "b": flat[8:]},  # not contiguous: per tensor
        lambda flat: {"a": flat[:6].clone(), "b": flat[6:]},  # two storages: per tensor
    ],
)
def test_the_fused_norm_is_the_norm_of_exactly_the_given_tensors(split):
    from fedtune.aggregation.clipping import fused_norm, update_norm

    flat = torch.arange(1.0, 13.0)
    parts = split(flat)
    assert fused_norm(parts) == pytest.approx(update_norm(parts), rel=1e-6)
    flat[-1] = float("nan")  # a NaN where a part reaches it makes the norm NaN, elsewhere not
    assert math.isfinite(fused_norm(parts)) == all(bool(torch.isfinite(t).all()) for t in parts.values())
