"""Flat buffers: which dicts tile one buffer, and the flat FedAvg path giving the per-tensor result bit for bit."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune.aggregation.base import Contribution
from fedtune.aggregation.combine import weighted_mean
from fedtune.aggregation.flat import flat_of, packed_like, same_layout, unflatten
from fedtune.aggregation.server_opt import Adaptive, Momentum, Sgd, SgdState
from fedtune.wire.link import pack_by_dtype, unpack_by_dtype


def _views(flat: torch.Tensor, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for name, shape in shapes.items():
        n = int(torch.Size(shape).numel())
        out[name] = flat[offset : offset + n].view(shape)
        offset += n
    return out


SHAPES = {"a": (3, 5), "b": (7,), "c": (2, 2, 3)}


def test_flat_of_is_the_buffer_only_for_contiguous_views_back_to_back_in_dict_order():
    flat = torch.arange(34.0)
    views = _views(flat, SHAPES)
    assert torch.equal(flat_of(views), flat)
    assert flat_of(dict(reversed(list(views.items())))) is None  # tiles, but not in dict order
    assert flat_of({"a": flat[:3], "c": flat[4:8]}) is None  # a gap
    assert flat_of({"a": flat[:3], "b": flat[3:6].clone()}) is None  # another tensor
    assert flat_of({"a": flat[:8].view(2, 4).t(), "b": flat[8:]}) is None  # not contiguous
    assert flat_of({"a": flat[:4], "b": flat[4:8].view(torch.int32)}) is None  # another dtype
    assert flat_of({}) is None
    assert torch.equal(flat_of({"x": flat[5:9]}), flat[5:9])  # a span, not the whole buffer


def test_packed_like_is_fresh_views_of_one_buffer_per_dtype_in_the_given_order():
    params = {"z": torch.ones(2, 3), "a": torch.ones(4), "m": torch.ones(5, dtype=torch.bfloat16)}
    packed = packed_like(params, ["a", "m", "z"])
    assert list(packed) == ["a", "m", "z"]
    assert {k: (v.shape, v.dtype) for k, v in packed.items()} == {k: (v.shape, v.dtype) for k, v in params.items()}
    assert flat_of({k: packed[k] for k in ("a", "z")}).numel() == 10  # the float32 ones share one buffer
    assert packed["m"].untyped_storage().data_ptr() != packed["a"].untyped_storage().data_ptr()
    only = packed_like({"b": torch.ones(3), "a": torch.ones(2, 2)}, ["b", "a"])
    assert flat_of(only).numel() == 7 and same_layout(only, unflatten(torch.zeros(7), only))
    with pytest.raises(ValueError, match="names 1 tensors, not the 2"):
        packed_like(only, ["a"])


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    sizes=st.lists(st.integers(1, 70), min_size=2, max_size=6),
    weights=st.lists(st.floats(0.1, 1e3), min_size=1, max_size=5),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_flat_fedavg_equals_the_per_tensor_path_bit_for_bit(sizes, weights, dtype):
    gen = torch.Generator().manual_seed(len(sizes) * 31 + len(weights))
    names = {f"t{i:02d}": (n,) if i % 2 else (1, n) for i, n in enumerate(sizes)}
    total = sum(n for n in sizes)

    def update() -> dict[str, torch.Tensor]:  # as decoded from the wire: views of one packed tensor
        return unpack_by_dtype(*pack_by_dtype(_views(torch.randn(total, generator=gen).to(dtype), names)))

    deltas = [update() for _ in weights]
    flat = [Contribution(i, d, w) for i, (d, w) in enumerate(zip(deltas, weights, strict=True))]
    separate = [c._replace(delta={k: v.clone() for k, v in c.delta.items()}) for c in flat]
    assert flat_of(flat[0].delta) is not None and flat_of(separate[0].delta) is None
    mean, reference = weighted_mean(flat), weighted_mean(separate)
    assert flat_of(mean) is not None
    assert all(torch.equal(mean[k], reference[k]) for k in reference)

    params = {k: torch.randn(v.shape, generator=gen).to(dtype) for k, v in reversed(reference.items())}
    for optimizer in (Sgd(), Sgd(lr=0.5), Momentum(lr=0.7), Adaptive("adam")):
        state = optimizer.init(params)
        first, state = optimizer.update(params, mean, state)  # separate params: per tensor, packed on the way
        assert flat_of(first) is not None  # packed in the order of the step
        second, _ = optimizer.update(first, mean, state)  # packed params and step: one kernel
        unpacked = {k: v.clone() for k, v in first.items()}
        reference_second, _ = optimizer.update(unpacked, reference, state)
        assert all(torch.equal(second[k], reference_second[k]) for k in params), optimizer


def test_plain_fedavg_returns_one_clients_update_exactly_on_the_flat_path():
    params = packed_like({"a": torch.ones(3), "b": torch.ones(2, 2)}, "ab")
    for v in params.values():
        v.copy_(torch.randn(v.shape))
    delta = unpack_by_dtype(*pack_by_dtype({k: torch.randn(v.shape) for k, v in params.items()}))
    new, _ = Sgd().update(params, weighted_mean([Contribution(0, delta, 3.0)]), SgdState())
    assert all(torch.equal(new[k], params[k] + delta[k]) for k in params)


def test_updates_decoded_from_the_wire_tile_and_fedavg_runs_flat_from_the_second_round():
    from fedtune.wire.link import Link

    gen = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.self_attn.{m}.lora_{ab}" for i in range(12) for m in "qv" for ab in "AB"]
    params = {n: torch.randn(4, 6, generator=gen) for n in names}  # the adapter's own (state dict) order

    def decoded() -> dict[str, torch.Tensor]:
        wire, _ = Link().encode({n: torch.randn(4, 6, generator=gen) for n in names}, {}, gen)
        return Link().decode(wire, params)

    state = SgdState()
    for _ in range(3):
        deltas = [decoded() for _ in range(3)]
        assert all(flat_of(d) is not None for d in deltas)  # layer 10 sorts before layer 2 on the wire, too
        mean = weighted_mean([Contribution(i, d, 1.0 + i) for i, d in enumerate(deltas)])
        assert flat_of(mean) is not None
        new, state = Sgd().update(params, mean, state)
        assert all(torch.equal(new[k], params[k] + mean[k]) for k in names)
        params = new
    assert same_layout(params, mean) and flat_of(params) is not None  # so the next step is one kernel
