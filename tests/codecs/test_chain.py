"""Chain: stage order, pass-through between stages, validation, bytes, determinism, wire round trip."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load, save

from fedtune.codecs import (
    BlockDropout,
    Cast,
    Chain,
    LowRank,
    Packed,
    Quantize,
    RandomK,
    TopK,
    build_chain,
    payload_bytes,
)
from tests.codecs.helpers import adapter_update, assert_same_layout, gen

ALL_STAGES = [
    [],
    [{"name": "fp16"}],
    [{"name": "bf16"}],
    [{"name": "int8", "rounding": "stochastic"}],
    [{"name": "int4", "per": "tensor"}],
    [{"name": "topk", "fraction": 0.1}, {"name": "int8"}],
    [{"name": "randk", "fraction": 0.2}, {"name": "bf16"}],
    [{"name": "lowrank", "rank": 2}, {"name": "fp16"}],
    [{"name": "block_dropout", "keep_fraction": 0.5}, {"name": "int4", "rounding": "stochastic"}],
    [{"name": "block_dropout"}, {"name": "lowrank", "rank": 2}, {"name": "topk"}, {"name": "int8"}],
]


@pytest.mark.parametrize("specs", ALL_STAGES, ids=lambda s: "->".join(x["name"] for x in s) or "none")
def test_round_trip_layout_determinism_and_wire(update, specs):
    update = {**update, "empty": torch.zeros(0, 4), "step": torch.tensor([3, 4])}  # edge cases ride along
    chain = build_chain(specs)
    packed, state = chain.encode(update, {}, gen(5))
    assert state == {}
    again, _ = chain.encode(update, {}, gen(5))
    assert packed.meta == again.meta and all(torch.equal(packed.tensors[k], again.tensors[k]) for k in packed.tensors)
    if "block_dropout" not in chain.describe():
        assert packed.tensors["step"] is update["step"] and packed.tensors["empty"] is update["empty"]
    decoded = chain.decode(packed)
    assert_same_layout(decoded, update)
    # through the wire: safetensors bytes and a JSON meta decode to the same update
    wire = Packed(load(save(packed.tensors)), json.loads(json.dumps(packed.meta)))
    rewired = chain.decode(wire)
    assert all(torch.equal(rewired[k], decoded[k]) for k in update)


def test_empty_chain_is_identity(update):
    chain = Chain([])
    packed, _ = chain.encode(update, {}, gen())
    assert packed.meta == {"codecs": [], "stages": []}
    assert all(packed.tensors[k] is t for k, t in update.items()) and set(packed.tensors) == set(update)
    assert chain.decode(packed) == update
    assert chain.describe() == "none"


def test_describe():
    chain = Chain([TopK(0.05), Quantize(8, "channel", "nearest")], error_feedback=True)
    assert chain.describe() == "topk(0.05) -> int8/channel/nearest (+error feedback)"
    assert Chain([LowRank(4), Cast("bfloat16")]).describe() == "lowrank(4) -> bf16"
    assert BlockDropout(0.5).describe() == "block_dropout(0.5)" and RandomK(0.1).describe() == "randk(0.1)"


def test_topk_then_int8_order_and_int_pass_through(update):
    topk, chain = Chain([TopK(0.1)]), Chain([TopK(0.1), Quantize(8)])
    alone, _ = topk.encode(update, {}, gen())
    packed, _ = chain.encode(update, {}, gen())
    for k in update:
        assert torch.equal(packed.tensors[f"{k}#indices"], alone.tensors[f"{k}#indices"])  # int32 untouched by int8
        assert packed.tensors[f"{k}#values#q"].dtype == torch.int8
        assert f"{k}#values" not in packed.tensors
    assert payload_bytes(packed.tensors) < payload_bytes(alone.tensors)
    decoded = chain.decode(packed)
    for k, x in update.items():  # zeros stay zeros; kept entries within int8 error of x
        kept = torch.zeros(x.numel(), dtype=torch.bool)
        kept[alone.tensors[f"{k}#indices"].long()] = True
        kept = kept.reshape(x.shape)
        assert (decoded[k][~kept] == 0).all()
        scale = x.abs().max() / 127
        assert ((decoded[k] - x)[kept].abs() <= scale / 2 + 1e-7).all()


def test_lowrank_then_fp16(update):
    chain = Chain([LowRank(2), Cast("float16")])
    packed, _ = chain.encode(update, {}, gen())
    lora = [k for k, t in update.items() if t.ndim == 2]
    assert {packed.tensors[f"{k}#u#half"].dtype for k in lora} == {torch.float16}
    assert packed.tensors["base_model.model.model.norm.weight#half"].dtype == torch.float16
    decoded = chain.decode(packed)
    reference = LowRank(2).decode(*LowRank(2).encode(update, gen()))
    for k in lora:
        assert torch.allclose(decoded[k], reference[k], rtol=1e-2, atol=1e-5)


def test_block_dropout_then_int4():
    update = adapter_update(layers=4)
    chain = Chain([BlockDropout(0.5), Quantize(4)])
    packed, _ = chain.encode(update, {}, gen())
    decoded = chain.decode(packed)
    assert_same_layout(decoded, update)
    sent = {k.split("#")[0] for k in packed.tensors}
    assert len(sent) < len(update) and all(
        packed.tensors[k].dtype in (torch.uint8, torch.float32) for k in packed.tensors
    )
    for k, x in update.items():
        if k in sent:
            assert (decoded[k] - x).abs().max() <= x.abs().max() / 7  # int4 error, nonzero
        else:
            assert (decoded[k] == 0).all()


def test_decode_validates_stages(update):
    chain = Chain([TopK(0.1), Quantize(8)])
    packed, _ = chain.encode(update, {}, gen())
    with pytest.raises(ValueError, match="2 codec stage"):
        Chain([TopK(0.1)]).decode(packed)
    with pytest.raises(ValueError, match=r"stage 1 mismatch.*int8/channel/nearest.*int4/channel/nearest"):
        Chain([TopK(0.1), Quantize(4)]).decode(packed)
    with pytest.raises(ValueError, match="0 codec stage"):
        chain.decode(Packed(update, {"codecs": [], "stages": []}))


def test_missing_part_is_an_error(update):
    chain = Chain([Quantize(8)])
    packed, _ = chain.encode(update, {}, gen())
    key = next(iter(update))
    tensors = {k: t for k, t in packed.tensors.items() if k != f"{key}#scale"}
    with pytest.raises(ValueError, match="missing parts"):
        chain.decode(Packed(tensors, packed.meta))


def test_payload_bytes():
    assert (
        payload_bytes({"a": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.int8), "c": torch.zeros(2).half()}) == 57
    )
