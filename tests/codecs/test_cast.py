"""Cast: layout round trip, relative error of fp16/bf16, the fp16 clamp, pass-through of non-float tensors."""

from __future__ import annotations

import pytest
import torch

from fedtune.codecs import Cast, payload_bytes
from tests.codecs.helpers import assert_same_layout, gen

BOUNDS = {"float16": 2.0**-11, "bfloat16": 2.0**-8}  # unit roundoff of round-to-nearest


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_round_trip_relative_error(update, dtype):
    codec = Cast(dtype)
    tensors, meta = codec.encode(update, gen())
    assert all(t.dtype == getattr(torch, dtype) for t in tensors.values())
    decoded = codec.decode(tensors, meta)
    assert_same_layout(decoded, update)
    for k, x in update.items():
        normal = x.abs() >= 2.0**-14  # fp16 normal range (the smallest update entries are subnormal)
        rel = ((decoded[k] - x).abs() / x.abs())[normal]
        assert rel.max() <= BOUNDS[dtype], k


def test_halves_the_bytes(update):
    tensors, _ = Cast("float16").encode(update, gen())
    assert payload_bytes(tensors) * 2 == payload_bytes(update)


def test_fp16_clamps_out_of_range():
    x = {"w": torch.tensor([1e6, -1e6, float("inf"), 3.0])}
    codec = Cast("float16")
    tensors, meta = codec.encode(x, gen())
    assert torch.isfinite(tensors["w#half"]).all()
    assert codec.decode(tensors, meta)["w"].tolist() == [65504.0, -65504.0, 65504.0, 3.0]


def test_bf16_keeps_large_values():
    x = {"w": torch.tensor([1e6, -1e30])}
    codec = Cast("bfloat16")
    decoded = codec.decode(*codec.encode(x, gen()))["w"]
    assert torch.allclose(decoded, x["w"], rtol=2.0**-8)


def test_decode_restores_float64():
    x = {"w": torch.randn(3, 5, dtype=torch.float64)}
    codec = Cast("bfloat16")
    decoded = codec.decode(*codec.encode(x, gen()))
    assert_same_layout(decoded, x)


def test_non_float_and_target_dtype_pass_through():
    x = {"idx": torch.arange(6, dtype=torch.int32), "h": torch.randn(4).half(), "f": torch.randn(4)}
    tensors, meta = Cast("float16").encode(x, gen())
    assert tensors["idx"] is x["idx"] and tensors["h"] is x["h"]
    assert set(tensors) == {"idx", "h", "f#half"}
    assert set(meta["keys"]) == {"f"}


def test_bad_dtype():
    with pytest.raises(ValueError, match="dtype"):
        Cast("float8")  # type: ignore[arg-type]
