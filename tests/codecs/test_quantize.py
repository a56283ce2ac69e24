"""Quantize: error bounds (nearest/stochastic, per tensor/channel), packing, bytes, unbiasedness, zeros."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune.codecs import Quantize, payload_bytes
from fedtune.codecs.quantize import pack_nibbles, unpack_nibbles
from tests.codecs.helpers import assert_same_layout, gen

LEVELS = {8: 127, 4: 7}
FAST = settings(max_examples=40, deadline=None, database=None)


def expected_scales(x: torch.Tensor, bits: int, per: str) -> torch.Tensor:
    """Per channel: max|slice| / L over the rows (m <= n) or the columns (m > n) of x as (m, n);
    otherwise (1,): max|x| / L."""
    if per != "channel" or x.ndim < 2:
        return x.reshape(1, -1).abs().amax(dim=1) / LEVELS[bits]
    m = x.reshape(x.shape[0], -1)  # (m, n)
    return m.abs().amax(dim=1 if m.shape[0] <= m.shape[1] else 0) / LEVELS[bits]


def per_entry(scales: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Each entry's scale, shaped like x."""
    if scales.numel() == 1:
        return scales.expand(x.shape)
    m = x.reshape(x.shape[0], -1)  # (m, n)
    grid = scales[:, None].expand(m.shape) if m.shape[0] <= m.shape[1] else scales[None, :].expand(m.shape)
    return grid.reshape(x.shape)


@FAST
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    bits=st.sampled_from([8, 4]),
    per=st.sampled_from(["tensor", "channel"]),
    rounding=st.sampled_from(["nearest", "stochastic"]),
    magnitude=st.sampled_from([1e-6, 1.0, 1e4]),
    seed=st.integers(0, 2**16),
)
def test_error_bound(shape, bits, per, rounding, magnitude, seed):
    x = {"w": magnitude * torch.randn(shape, generator=gen(seed))}
    codec = Quantize(bits, per, rounding)
    tensors, meta = codec.encode(x, gen(seed + 1))
    decoded = codec.decode(tensors, meta)
    assert_same_layout(decoded, x)
    scales = expected_scales(x["w"], bits, per)  # (rows,)
    assert torch.equal(tensors["w#scale"], scales)
    scale = per_entry(scales, x["w"])
    err = (decoded["w"] - x["w"]).abs()
    slack = 1e-6 * scale  # float32 arithmetic in x / scale * scale
    if rounding == "nearest":
        assert (err <= scale / 2 + slack).all()
    else:
        assert (err < scale + slack).all()


def test_per_channel_uses_row_scales():
    x = {"w": torch.stack([torch.linspace(-1, 1, 32), 1000 * torch.linspace(-1, 1, 32)])}  # (2, 32)
    err = {}
    for per in ("tensor", "channel"):
        codec = Quantize(8, per)
        tensors, meta = codec.encode(x, gen())
        err[per] = (codec.decode(tensors, meta)["w"][0] - x["w"][0]).abs().max()
    assert torch.allclose(Quantize(8, "channel").encode(x, gen())[0]["w#scale"], torch.tensor([1 / 127, 1000 / 127]))
    assert err["channel"] <= 0.5 / 127 + 1e-7
    assert err["tensor"] > 10 * err["channel"]  # the large row's scale swamps the small row


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_zero_tensor_and_zero_row(bits, rounding):
    x = {"z": torch.zeros(3, 5), "w": torch.cat([torch.zeros(1, 5), torch.randn(2, 5)])}
    codec = Quantize(bits, "channel", rounding)
    decoded = codec.decode(*codec.encode(x, gen()))
    assert torch.equal(decoded["z"], x["z"])
    assert torch.equal(decoded["w"][0], torch.zeros(5))
    assert torch.isfinite(decoded["w"]).all()


@pytest.mark.parametrize("n", [1, 2, 7, 8])
def test_nibble_packing_round_trip(n):
    q = torch.randint(-7, 8, (n,), generator=gen(n))
    packed = pack_nibbles(q)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n / 2)
    nibbles = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)[:n]
    assert ((nibbles >= 1) & (nibbles <= 15)).all()
    assert torch.equal(unpack_nibbles(packed, n), q.to(torch.int32))


@pytest.mark.parametrize(("bits", "q_bytes"), [(8, lambda n: n), (4, lambda n: math.ceil(n / 2))])
@pytest.mark.parametrize("per", ["tensor", "channel"])
def test_payload_bytes(update, bits, q_bytes, per):
    x = {**update, "odd": torch.randn(3, 7)}
    tensors, _ = Quantize(bits, per).encode(x, gen())
    rows = {
        k: min(t.shape[0], t.numel() // t.shape[0]) if per == "channel" and t.ndim >= 2 else 1 for k, t in x.items()
    }
    assert payload_bytes(tensors) == sum(q_bytes(t.numel()) + 4 * rows[k] for k, t in x.items())
    dtype = torch.int8 if bits == 8 else torch.uint8
    assert all(tensors[f"{k}#q"].dtype == dtype and tensors[f"{k}#scale"].dtype == torch.float32 for k in x)
    # ~1/4 and ~1/8 of float32 plus a scale per tensor, or per rank component of a LoRA factor
    bound = {("tensor", 8): 0.26, ("tensor", 4): 0.135, ("channel", 8): 0.28, ("channel", 4): 0.15}[per, bits]
    assert payload_bytes(tensors) / payload_bytes(x) < bound


@pytest.mark.parametrize("bits", [8, 4])
def test_stochastic_rounding_is_unbiased(bits):
    draws = 2000
    x = torch.randn(16, generator=gen(5))
    x[0] = x.abs().max() + 0.1  # a fixed max, so every copy has the same scale
    rows = x.expand(draws, 16).clone()  # (draws, 16): one independent draw per row, same row scale
    codec = Quantize(bits, "tensor", "stochastic")  # one scale: every draw rounds x on the same grid
    decoded = codec.decode(*codec.encode({"w": rows}, gen(6)))["w"]  # (draws, 16)
    scale = x.abs().max() / LEVELS[bits]
    stderr = scale / 2 / math.sqrt(draws)  # Bernoulli spread is at most scale / 2
    assert ((decoded.mean(dim=0) - x).abs() <= 5 * stderr + 1e-6).all()
    nearest = Quantize(bits, "tensor", "nearest")
    biased = nearest.decode(*nearest.encode({"w": rows}, gen(6)))["w"].mean(dim=0)
    assert ((biased - x).abs() > 5 * stderr).any()  # nearest is biased where x is far from a level


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_determinism(update, rounding):
    codec = Quantize(4, "channel", rounding)
    a, meta_a = codec.encode(update, gen(3))
    b, meta_b = codec.encode(update, gen(3))
    c, _ = codec.encode(update, gen(4))
    assert meta_a == meta_b and all(torch.equal(a[k], b[k]) for k in a)
    same_as_other_seed = all(torch.equal(a[k], c[k]) for k in a)
    assert same_as_other_seed == (rounding == "nearest")


def test_passes_through_non_float_and_keeps_dtype():
    x = {"i": torch.arange(5), "h": torch.randn(4, 3).to(torch.bfloat16)}
    codec = Quantize(8)
    tensors, meta = codec.encode(x, gen())
    assert tensors["i"] is x["i"] and set(meta["keys"]) == {"h"}
    assert_same_layout(codec.decode(tensors, meta), x)


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"bits": 2}, "bits"), ({"per": "row"}, "per"), ({"rounding": "up"}, "rounding")]
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Quantize(**kwargs)
