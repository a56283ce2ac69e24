"""LowRank: Eckart–Young error, rank clamping, which tensors it applies to, dtype kept."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune.codecs import LowRank, payload_bytes
from tests.codecs.helpers import assert_same_layout, gen


@settings(max_examples=30, deadline=None, database=None)
@given(m=st.integers(1, 40), n=st.integers(1, 40), rank=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_eckart_young_error(m, n, rank, seed):
    x = torch.randn(m, n, generator=gen(seed))
    codec = LowRank(rank)
    tensors, meta = codec.encode({"w": x}, gen())
    decoded = codec.decode(tensors, meta)
    assert_same_layout(decoded, {"w": x})
    r = min(rank, m, n)
    if (m + n) * r >= m * n:  # would not save bytes: sent as is
        assert tensors == {"w": x} and meta["keys"] == {}
        return
    assert tensors["w#u"].shape == (m, r) and tensors["w#v"].shape == (r, n)
    s = torch.linalg.svdvals(x.double())
    expected = s[r:].square().sum().sqrt()
    assert torch.allclose((x - decoded["w"]).double().norm(), expected, rtol=1e-4, atol=1e-5)


def test_exact_for_low_rank_matrix():
    g = gen(2)
    x = torch.randn(30, 3, generator=g) @ torch.randn(3, 20, generator=g)  # rank 3
    codec = LowRank(3)
    decoded = codec.decode(*codec.encode({"w": x}, gen()))["w"]
    assert torch.allclose(decoded, x, atol=1e-4)
    assert not torch.allclose(LowRank(2).decode(*LowRank(2).encode({"w": x}, gen()))["w"], x, atol=1e-2)


def test_applies_only_where_it_saves_bytes(update):
    x = {**update, "square": torch.randn(8, 8), "ints": torch.ones(40, 40, dtype=torch.int32)}
    tensors, meta = LowRank(4).encode(x, gen())
    # lora_A (4, 48) / lora_B (48, 4) are already rank 4: (4 + 48) * 4 > 192; (8 + 8) * 4 = 64 is not < 64
    assert set(meta["keys"]) == set()
    assert all(tensors[k] is t for k, t in x.items())
    tensors, meta = LowRank(2).encode(x, gen())
    lora = {k for k, t in update.items() if t.ndim == 2}
    assert set(meta["keys"]) == lora | {"square"}
    assert payload_bytes(tensors) < payload_bytes(x)


def test_keeps_half_dtype():
    x = {"w": torch.randn(32, 24).to(torch.bfloat16)}
    codec = LowRank(2)
    tensors, meta = codec.encode(x, gen())
    assert tensors["w#u"].dtype == tensors["w#v"].dtype == torch.bfloat16
    assert_same_layout(codec.decode(tensors, meta), x)


@pytest.mark.parametrize("rank", [0, -1, 2.5, True])
def test_bad_rank(rank):
    with pytest.raises(ValueError, match="rank"):
        LowRank(rank)
