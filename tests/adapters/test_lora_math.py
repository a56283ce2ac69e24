"""LoRA algebra: exact sums of products, refactorisation, and the error of naive averaging."""

from __future__ import annotations

import pytest
import torch

from fedtune.adapters.lora_math import (
    factor_averaging_error,
    lora_pairs,
    refactor,
    stacked_factors,
    svd_of_product,
)
from fedtune.aggregation import Contribution
from fedtune.aggregation.lora import LoraExact, LoraExactState

ALPHA = 16.0


def _factors(seed, r=4, out=24, inp=20, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(r, inp, generator=g), scale * torch.randn(out, r, generator=g)  # A (r, in), B (out, r)


def test_pairs_are_found_sorted_and_checked():
    keys = ["m2.lora_B.weight", "m1.lora_A.weight", "m2.lora_A.weight", "m1.lora_B.weight"]
    assert [p.module for p in lora_pairs(keys)] == ["m1", "m2"]
    with pytest.raises(ValueError, match="no matching"):
        lora_pairs(["m1.lora_A.weight"])
    with pytest.raises(ValueError, match="without their A"):
        lora_pairs(["m1.lora_B.weight"])


def test_stacked_factors_are_the_exact_weighted_sum_of_products():
    facs = [_factors(s) for s in range(3)]
    coeffs = [0.2, 0.5, 0.3]
    b, a = stacked_factors([f[1] for f in facs], [f[0] for f in facs], coeffs)
    dense = sum(c * (f[1].double() @ f[0].double()) for f, c in zip(facs, coeffs, strict=True))
    assert torch.allclose(b @ a, dense, atol=1e-12)


def test_svd_of_product_matches_dense_svd():
    b, a = torch.randn(30, 12, dtype=torch.float64), torch.randn(12, 25, dtype=torch.float64)
    u, s, vh = svd_of_product(b, a)
    assert torch.allclose(u @ torch.diag(s) @ vh, b @ a, atol=1e-10)
    assert torch.allclose(s, torch.linalg.svdvals(b @ a)[: s.numel()], atol=1e-10)


def test_refactor_is_the_best_rank_r_approximation_and_reports_its_error():
    b, a = torch.randn(30, 12, dtype=torch.float64), torch.randn(12, 25, dtype=torch.float64)
    dense = b @ a
    u, s, vh = svd_of_product(b, a)
    scale = ALPHA / 4
    a4, b4, tail = refactor(u, s, vh, 4, scale, torch.float64)
    approx = scale * b4 @ a4
    uu, ss, vv = torch.linalg.svd(dense)
    best = uu[:, :4] @ torch.diag(ss[:4]) @ vv[:4]
    assert torch.allclose(approx, best, atol=1e-9)
    assert tail == pytest.approx(float((dense - approx).pow(2).sum()), rel=1e-9)
    # balanced split: both factors carry sqrt of the singular values
    assert torch.allclose(b4.norm(dim=0), a4.norm(dim=1), atol=1e-9)


def test_factor_averaging_error_matches_dense():
    facs = [_factors(s) for s in range(3)]
    w = [0.5, 0.25, 0.25]
    scale = ALPHA / 4
    err, total = factor_averaging_error([f[1] for f in facs], [f[0] for f in facs], w, scale)
    exact = scale * sum(c * f[1].double() @ f[0].double() for f, c in zip(facs, w, strict=True))
    naive = (
        scale
        * sum(c * f[1].double() for f, c in zip(facs, w, strict=True))
        @ sum(c * f[0].double() for f, c in zip(facs, w, strict=True))
    )
    assert err == pytest.approx(float((exact - naive).pow(2).sum()), rel=1e-9)
    assert total == pytest.approx(float(exact.pow(2).sum()), rel=1e-9)
    shared_a = factor_averaging_error([f[1] for f in facs], [facs[0][0]] * 3, w, scale)[0]
    assert shared_a == pytest.approx(0.0, abs=1e-6)  # FFA-LoRA: with A shared, averaging B is exact


def _contrib(cid, params, a, b, weight):
    return Contribution(
        cid,
        {"m.lora_A.weight": a - params["m.lora_A.weight"], "m.lora_B.weight": b - params["m.lora_B.weight"]},
        weight,
    )


def test_lora_exact_equals_the_weighted_mean_of_products_when_it_fits_the_rank():
    """Clients whose products share a row space: the mean has rank <= r, so nothing is truncated."""
    r = 4
    a_shared, _ = _factors(0, r)
    params = {"m.lora_A.weight": torch.zeros(r, 20), "m.lora_B.weight": torch.zeros(24, r)}
    clients = [(a_shared, _factors(s, r)[1]) for s in (1, 2, 3)]
    weights = [1.0, 2.0, 5.0]
    agg = LoraExact(ALPHA)
    new, state = agg.aggregate(
        params,
        [_contrib(i, params, a, b, w) for i, ((a, b), w) in enumerate(zip(clients, weights, strict=True))],
        agg.init(params),
    )
    scale = ALPHA / r
    expected = sum(w * scale * b @ a for (a, b), w in zip(clients, weights, strict=True)) / sum(weights)
    got = scale * new["m.lora_B.weight"] @ new["m.lora_A.weight"]
    assert torch.allclose(got, expected, atol=1e-5 * expected.abs().max())
    assert state.truncation_error < 1e-6 and state.rounds == 1


def test_lora_exact_truncation_error_is_the_true_relative_error():
    r = 4
    params = {"m.lora_A.weight": torch.zeros(r, 20), "m.lora_B.weight": torch.zeros(24, r)}
    clients = [_factors(s, r) for s in range(4)]
    agg = LoraExact(ALPHA)
    new, state = agg.aggregate(
        params, [_contrib(i, params, a, b, 1.0) for i, (a, b) in enumerate(clients)], LoraExactState()
    )
    scale = ALPHA / r
    exact = sum(scale * b.double() @ a.double() for a, b in clients) / 4
    got = scale * new["m.lora_B.weight"].double() @ new["m.lora_A.weight"].double()
    true_rel = float((exact - got).norm() / exact.norm())
    assert state.truncation_error == pytest.approx(true_rel, rel=1e-4)
    assert 0.1 < state.truncation_error < 1.0  # four independent rank-4 updates do not fit in rank 4


def test_lora_exact_identical_clients_reproduce_the_product():
    r = 4
    params = {"m.lora_A.weight": torch.zeros(r, 20), "m.lora_B.weight": torch.zeros(24, r)}
    a, b = _factors(7, r)
    agg = LoraExact(ALPHA)
    new, state = agg.aggregate(params, [_contrib(i, params, a, b, 1.0 + i) for i in range(3)], agg.init(params))
    assert torch.allclose(new["m.lora_B.weight"] @ new["m.lora_A.weight"], b @ a, atol=1e-4)
    assert state.truncation_error < 1e-6


def test_refactor_near_previous_factors_keeps_product_and_balance_and_stays_close():
    from fedtune.adapters.lora_math import refactor, svd_of_product

    g = torch.Generator().manual_seed(0)
    a1, b1 = torch.randn(4, 32, generator=g, dtype=torch.float64), torch.randn(24, 4, generator=g, dtype=torch.float64)
    u, s, vh = svd_of_product(b1 * 2.0, a1)
    a_prev, b_prev, _ = refactor(u, s, vh, 4, 2.0, torch.float64)  # last round's global factors
    # this round: a slightly different product
    b2 = b1 + 0.05 * torch.randn(24, 4, generator=g, dtype=torch.float64)
    u, s, vh = svd_of_product(b2 * 2.0, a1)
    plain_a, plain_b, _ = refactor(u, s, vh, 4, 2.0, torch.float64)
    # an arbitrary rotation of the previous factors, as an SVD may return them
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    a_prev, b_prev = q.T @ a_prev, b_prev @ q
    near_a, near_b, _ = refactor(u, s, vh, 4, 2.0, torch.float64, near=(a_prev, b_prev))
    assert torch.allclose(near_b @ near_a, plain_b @ plain_a, atol=1e-9)  # same product: still exact
    # exactly as balanced as the even split (same Gram spectra), so local training sees the same scales
    for x, y in ((near_a @ near_a.T, plain_a @ plain_a.T), (near_b.T @ near_b, plain_b.T @ plain_b)):
        assert torch.allclose(torch.linalg.eigvalsh(x), torch.linalg.eigvalsh(y), atol=1e-9)
    gap = lambda a, b: float((a - a_prev).norm() ** 2 + (b - b_prev).norm() ** 2)  # noqa: E731
    assert gap(near_a, near_b) < 0.1 * gap(plain_a, plain_b)  # the rotation is undone: factors stay close
