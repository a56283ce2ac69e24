"""TopK and RandomK: kept entries exact, top-k keeps the largest (energy bound), random-k regenerates indices."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune.codecs import RandomK, TopK, payload_bytes
from fedtune.codecs.base import fraction_count
from tests.codecs.helpers import assert_same_layout, gen

FAST = settings(max_examples=40, deadline=None, database=None)


def test_fraction_count():
    assert fraction_count(0.07, 100) == 7  # 0.07 * 100 = 7.000000000000001 in floating point
    assert fraction_count(0.1, 5) == 1
    assert fraction_count(0.001, 10) == 1  # at least one
    assert fraction_count(1.0, 10) == 10
    assert fraction_count(0.25, 9) == 3


@FAST
@given(
    shape=st.lists(st.integers(1, 12), min_size=1, max_size=3),
    fraction=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**16),
)
def test_topk_keeps_largest_exactly(shape, fraction, seed):
    x = torch.randn(shape, generator=gen(seed))
    codec = TopK(fraction)
    tensors, meta = codec.encode({"w": x}, gen())
    decoded = codec.decode(tensors, meta)
    assert_same_layout(decoded, {"w": x})
    n = x.numel()
    k = max(1, math.ceil(fraction * n - 1e-9))
    idx = tensors["w#indices"].long()
    assert idx.numel() == k and tensors["w#indices"].dtype == (torch.int16 if n <= 2**15 else torch.int32)
    kept = torch.zeros(n, dtype=torch.bool)
    kept[idx] = True
    flat, out = x.reshape(-1), decoded["w"].reshape(-1)
    assert torch.equal(out[kept], flat[kept]) and (out[~kept] == 0).all()
    if k < n:
        assert flat[kept].abs().min() >= flat[~kept].abs().max()
    err2 = (x - decoded["w"]).square().sum()
    assert err2 <= (1 - k / n) * x.square().sum() * (1 + 1e-6)


def test_topk_payload_bytes(update):
    tensors, _ = TopK(0.1).encode(update, gen())
    k = {key: math.ceil(0.1 * t.numel()) for key, t in update.items()}
    assert payload_bytes(tensors) == sum(4 * k[key] + 2 * k[key] for key in update)  # float32 values + int16 indices


def test_topk_passes_int_tensors_and_keeps_dtype():
    x = {"i": torch.arange(10, dtype=torch.int32), "h": torch.randn(6, 5).half()}
    codec = TopK(0.2)
    tensors, meta = codec.encode(x, gen())
    assert tensors["i"] is x["i"] and tensors["h#values"].dtype == torch.float16
    assert_same_layout(codec.decode(tensors, meta), x)


@FAST
@given(
    shape=st.lists(st.integers(1, 12), min_size=1, max_size=3),
    fraction=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**16),
)
def test_randk_kept_entries_exact(shape, fraction, seed):
    x = torch.randn(shape, generator=gen(seed)) + 3.0  # no zeros, so "kept" = nonzero after decode
    codec = RandomK(fraction)
    tensors, meta = codec.encode({"w": x}, gen(seed))
    decoded = codec.decode(tensors, meta)["w"]
    assert decoded.shape == x.shape
    kept = decoded != 0
    k = max(1, math.ceil(fraction * x.numel() - 1e-9))
    assert int(kept.sum()) == k == tensors["w#values"].numel()
    assert torch.equal(decoded[kept], x[kept])


def test_randk_sends_values_only_and_regenerates_indices(update):
    codec = RandomK(0.1)
    tensors, meta = codec.encode(update, gen(7))
    assert set(tensors) == {f"{k}#values" for k in update}
    assert payload_bytes(tensors) == sum(4 * math.ceil(0.1 * t.numel()) for t in update.values())
    assert isinstance(meta["seed"], int)
    decoded = RandomK(0.1).decode(dict(reversed(tensors.items())), meta)  # a fresh decoder, any key order
    assert_same_layout(decoded, update)
    for k, x in update.items():
        kept = decoded[k] != 0
        assert torch.equal(decoded[k][kept], x[kept])
    other = dict(meta, seed=meta["seed"] + 1)  # a different seed scatters the same values elsewhere
    assert any(not torch.equal(RandomK(0.1).decode(tensors, other)[k], decoded[k]) for k in update)


def test_randk_indices_uniform():
    n, draws = 10, 3000
    counts = torch.zeros(n)
    g = gen(11)
    codec = RandomK(0.2)
    for _ in range(draws):
        counts += codec.decode(*codec.encode({"w": torch.ones(n)}, g))["w"]
    expected = draws * 0.2
    assert ((counts - expected).abs() < 5 * math.sqrt(expected)).all()


@pytest.mark.parametrize("codec", [TopK(0.05), RandomK(0.05)])
def test_determinism(update, codec):
    a, meta_a = codec.encode(update, gen(3))
    b, meta_b = codec.encode(update, gen(3))
    assert meta_a == meta_b and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("cls", [TopK, RandomK])
@pytest.mark.parametrize("fraction", [0.0, 1.5, -0.1, "0.1", True])
def test_bad_fraction(cls, fraction):
    with pytest.raises(ValueError, match="fraction"):
        cls(fraction)


def test_index_dtype_is_the_narrowest_that_fits():
    from fedtune.codecs.sparsify import _index_dtype

    assert [_index_dtype(n) for n in (10, 2**15, 2**15 + 1, 2**31, 2**31 + 1)] == [
        torch.int16,
        torch.int16,
        torch.int32,
        torch.int32,
        torch.int64,
    ]
