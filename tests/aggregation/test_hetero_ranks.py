"""Heterogeneous LoRA ranks: each client gets an adapter of its own rank; FlexLoRA and HetLoRA aggregation."""

from __future__ import annotations

import torch

from fedtune.adapters.lora_math import pad_to_rank, rank_of, rank_view
from fedtune.aggregation import Contribution, build_aggregator

ALPHA, R = 16.0, 16
RANKS = {0: 2, 1: 4, 2: 8}  # client 3 trains the global rank 16


def _global(seed=0, out=24, inp=20):
    g = torch.Generator().manual_seed(seed)
    return {"m.lora_A.weight": torch.randn(R, inp, generator=g), "m.lora_B.weight": torch.randn(out, R, generator=g)}


def _product(p):
    a, b = p["m.lora_A.weight"], p["m.lora_B.weight"]
    return (ALPHA / a.shape[0]) * b.double() @ a.double()


def test_rank_view_keeps_the_leading_components_and_padding_inverts_it():
    glob = _global()
    for r in (2, 4, 8, 16):
        view = rank_view(glob, r, R)
        assert rank_of(view) == r
        lead = (ALPHA / R) * glob["m.lora_B.weight"][:, :r].double() @ glob["m.lora_A.weight"][:r].double()
        assert torch.allclose(_product(view), lead, atol=1e-5)
        assert torch.allclose(_product(pad_to_rank(view, R)), lead, atol=1e-5)


def _clients_in_a_shared_subspace(glob, seed=1, basis_rank=2):
    """Client factors whose products all live in one rank-2 row space: their mean fits in rank R."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(basis_rank, glob["m.lora_A.weight"].shape[1], generator=g)
    out = {}
    for cid in range(4):
        r = RANKS.get(cid, R)
        a = torch.randn(r, basis_rank, generator=g) @ basis
        b = torch.randn(glob["m.lora_B.weight"].shape[0], r, generator=g)
        out[cid] = {"m.lora_A.weight": a, "m.lora_B.weight": b}
    return out


def test_flexlora_each_client_receives_its_own_rank():
    agg = build_aggregator(name="fedavg", lora_alpha=ALPHA, client_ranks=RANKS)
    glob = _global()
    state = agg.init(glob)
    for cid in range(4):
        assert rank_of(agg.client_view(glob, state, cid)) == RANKS.get(cid, R)


def test_flexlora_equals_the_weighted_mean_of_products_at_their_own_ranks():
    agg = build_aggregator(name="fedavg", lora_alpha=ALPHA, client_ranks=RANKS)
    glob = _global()
    state = agg.init(glob)
    local = _clients_in_a_shared_subspace(glob)
    weights = [1.0, 2.0, 3.0, 4.0]
    contribs = []
    for cid, w in enumerate(weights):
        view = agg.client_view(glob, state, cid)
        contribs.append(Contribution(cid, {k: local[cid][k] - view[k] for k in view}, w))
    new, state = agg.aggregate(glob, contribs, state)
    expected = sum(w * _product(local[c]) for c, w in enumerate(weights)) / sum(weights)
    assert torch.allclose(_product(new), expected, atol=1e-5 * float(expected.abs().max()))
    assert state.truncation_error < 1e-6
    assert rank_of(new) == R


def test_hetlora_zero_padding_is_the_mean_of_padded_factors():
    agg = build_aggregator(name="fedavg", lora="naive", lora_alpha=ALPHA, client_ranks=RANKS)
    glob = _global()
    state = agg.init(glob)
    local = {c: _global(10 + c) for c in range(4)}
    local = {c: rank_view(p, RANKS.get(c, R), R) for c, p in local.items()}
    contribs = []
    for cid in range(4):
        view = agg.client_view(glob, state, cid)
        contribs.append(Contribution(cid, {k: local[cid][k] - view[k] for k in view}, 1.0))
    new, state = agg.aggregate(glob, contribs, state)
    padded = [pad_to_rank(local[c], R) for c in range(4)]
    for k in glob:
        assert torch.allclose(new[k], sum(p[k] for p in padded) / 4, atol=1e-6)
    assert 0 < state.factor_averaging_error < 1
