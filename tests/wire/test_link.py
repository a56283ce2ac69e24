"""The wire link: names by index, packing by dtype, compressed meta; bytes at the bundled model's size."""

from __future__ import annotations

import pytest
import torch

from fedtune.paradigms.parameter_sharing.messages import TrainReply
from fedtune.wire.link import META, Link, pack_by_dtype, unpack_by_dtype
from fedtune.wire.messages import decode_message, encode_message


def smollm2_lora_update(seed: int = 0) -> dict[str, torch.Tensor]:
    """Shapes of SmolLM2-135M's LoRA r=8 on q/k/v/o (30 layers, hidden 576, 3 KV heads of 64)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(30):
        for mod, d_out in (("q_proj", 576), ("k_proj", 192), ("v_proj", 192), ("o_proj", 576)):
            base = f"base_model.model.model.layers.{layer}.self_attn.{mod}"
            out[f"{base}.lora_A.weight"] = 1e-3 * torch.randn(8, 576, generator=g)
            out[f"{base}.lora_B.weight"] = 1e-3 * torch.randn(d_out, 8, generator=g)
    return out


def _reply_bytes(delta) -> int:
    common = dict(round=1, num_examples=100, num_tokens=1000, steps=5, train_loss=1.0, local_train_s=1.0)
    return len(encode_message(TrainReply(delta=delta, **common)))


@pytest.fixture(scope="module")
def update():
    return smollm2_lora_update()


def test_round_trip_restores_names_shapes_and_values(update):
    wire, _ = Link().encode(update, {}, torch.Generator())
    assert set(wire) == {"float32", META}  # one packed tensor, plus the meta
    back = Link().decode(wire, update.keys())
    assert back.keys() == update.keys() and all(torch.equal(back[k], update[k]) for k in update)


@pytest.mark.parametrize(
    ("specs", "min_ratio"),
    [
        ([], 1.0),
        (["bf16"], 1.99),
        (["int8"], 3.95),
        (["int4"], 7.8),
        ([{"name": "topk", "fraction": 0.02}, "int8"], 58),  # 1 byte value + 2 byte int16 index per kept entry
        ([{"name": "randk", "fraction": 0.05}, "int8"], 70),  # indices regenerate from a seed
    ],
)
def test_bytes_on_the_wire_at_the_bundled_models_size(update, specs, min_ratio):
    """Whole serialised messages against fp32 with full parameter names (what a naive wire sends)."""
    naive = _reply_bytes(update)
    link = Link.from_specs([s if isinstance(s, dict) else {"name": s} for s in specs])
    wire, _ = link.encode(update, {}, torch.Generator().manual_seed(0))
    assert naive / _reply_bytes(wire) >= min_ratio
    decoded = link.decode(
        decode_message(encode_message(TrainReply(1, wire, 1, 1, 1, 0.0, 0.0)), TrainReply).delta, update
    )
    assert decoded.keys() == update.keys()


def test_receiver_with_other_names_is_refused(update):
    wire, _ = Link().encode(update, {}, torch.Generator())
    fewer = sorted(update)[:-2]
    with pytest.raises(ValueError, match="expected the 238 this receiver holds"):
        Link().decode(wire, fewer)


def test_missing_or_corrupt_meta_is_an_error(update):
    wire, _ = Link().encode(update, {}, torch.Generator())
    with pytest.raises(ValueError, match="no 'meta' tensor"):
        Link().decode({k: v for k, v in wire.items() if k != META}, update)
    with pytest.raises(ValueError, match="unreadable codec meta"):
        Link().decode({**wire, META: torch.zeros(5, dtype=torch.uint8)}, update)


def test_pack_by_dtype_round_trip_and_layout_check():
    parts = {"0#q": torch.arange(6, dtype=torch.int8).reshape(2, 3), "0#scale": torch.ones(2), "1": torch.zeros(3)}
    flat, layout = pack_by_dtype(parts)
    assert set(flat) == {"int8", "float32"} and flat["float32"].numel() == 5
    back = unpack_by_dtype(flat, layout)
    assert all(torch.equal(back[k], parts[k]) for k in parts)
    with pytest.raises(ValueError, match="has 4 values, its layout 5"):
        unpack_by_dtype({**flat, "float32": torch.zeros(4)}, layout)


def test_block_dropout_through_the_link_still_drops_whole_layers(update):
    """Short wire names keep the layer number, so FedOBD's blocks are transformer layers."""
    link = Link.from_specs([{"name": "block_dropout", "keep_fraction": 0.1}])
    scaled = {k: v * (10.0 if ".layers.7." in k or ".layers.21." in k else 1.0) for k, v in update.items()}
    wire, _ = link.encode(scaled, {}, torch.Generator())
    decoded = link.decode(wire, scaled)
    sent = [k for k, v in decoded.items() if v.abs().sum() > 0]
    layers = {k.split(".layers.")[1].split(".")[0] for k in sent}
    assert len(layers) == 3 and {"7", "21"} <= layers  # ceil(0.1 * 30) = 3 layers, the most changed among them
    assert len(sent) == 3 * 8  # whole layers: all 8 LoRA tensors of each
    assert all(torch.equal(decoded[k], scaled[k]) for k in sent)


@pytest.mark.parametrize(
    "meta, why",
    [
        (b"[" + b" " * 50_000_000 + b"]", "limit"),  # 50 MB of JSON from ~50 KB on the wire
        (b'"just a string"', "not an object"),
        (b'{"layout": [1, 2]}', "not an object"),
        (b"[" * 100_000 + b"]" * 100_000, "limit|unreadable"),
    ],
)
def test_a_crafted_meta_is_refused_before_it_is_inflated_or_trusted(update, meta, why):
    import zlib

    wire, _ = Link().encode(update, {}, torch.Generator())
    wire[META] = torch.frombuffer(bytearray(zlib.compress(meta, 9)), dtype=torch.uint8)
    assert wire[META].numel() < 100_000
    with pytest.raises(ValueError, match=why):
        Link().decode(wire, update.keys())


def test_a_truncated_meta_is_refused(update):
    wire, _ = Link().encode(update, {}, torch.Generator())
    wire[META] = wire[META][:-4].clone()
    with pytest.raises(ValueError, match="unreadable codec meta"):
        Link().decode(wire, update.keys())


def _tampered(wire: dict, change) -> dict:
    import json
    import zlib

    meta = json.loads(zlib.decompress(wire[META].numpy().tobytes()))
    change(meta)
    packed = zlib.compress(json.dumps(meta).encode(), 9)
    return {**wire, META: torch.frombuffer(bytearray(packed), dtype=torch.uint8)}


def _declare_everywhere(node, shape) -> None:
    if isinstance(node, dict):
        if "shape" in node:
            node["shape"] = shape
        for v in node.values():
            _declare_everywhere(v, shape)
    elif isinstance(node, list):
        for v in node:
            _declare_everywhere(v, shape)


@pytest.mark.parametrize(
    "specs",
    [
        [{"name": "topk", "fraction": 0.05}],
        [{"name": "randk", "fraction": 0.05}, {"name": "int8"}],
        [{"name": "block_dropout", "keep_fraction": 0.5}],
        [{"name": "lowrank", "rank": 2}],
    ],
    ids=lambda specs: "+".join(s["name"] for s in specs),
)
@pytest.mark.parametrize("shape", [[100_000, 100_000], [-1, 8], [8.5, 2], "big"])
def test_declared_shapes_are_bounded_by_what_the_receiver_holds_before_anything_is_allocated(update, specs, shape):
    link = Link.from_specs(specs)
    wire, _ = link.encode(update, {}, torch.Generator().manual_seed(0))
    assert link.decode(wire, update).keys() == update.keys()  # the honest message decodes
    crafted = _tampered(wire, lambda meta: _declare_everywhere(meta, shape))
    with pytest.raises(ValueError, match="codec meta declares"):
        link.decode(crafted, update)  # 10^10 values declared: refused, not allocated


def test_low_rank_factors_must_make_the_declared_shape(update):
    link = Link.from_specs([{"name": "lowrank", "rank": 2}])
    wire, _ = link.encode(update, {}, torch.Generator().manual_seed(0))

    def tall_u(meta):  # split the values differently: u (4608, 1) @ v (1, 576) instead of (8, 2) @ (2, 576)
        for entries in meta["layout"].values():
            for entry in entries:
                if entry[0].endswith("#u") and entry[1] == [8, 2]:
                    entry[1] = [16, 1]
                if entry[0].endswith("#v") and entry[1] == [2, 576]:
                    entry[1] = [1, 1152]

    with pytest.raises(ValueError, match="do not make"):
        link.decode(_tampered(wire, tall_u), update)


def test_an_update_decoded_without_codecs_is_tiled_over_its_packed_tensor(update):
    from fedtune.aggregation.flat import flat_of
    from fedtune.core.types import Tiled

    wire, _ = Link().encode(update, {}, torch.Generator())
    decoded = Link().decode(wire, update)
    assert type(decoded) is Tiled and decoded.keys() == update.keys()
    assert all(torch.equal(decoded[k], update[k]) for k in update)
    assert torch.equal(decoded.buffer, torch.cat([t.reshape(-1) for t in decoded.values()]))
    assert flat_of(dict(decoded)) is not None  # what the buffer claims, the tensors confirm

    def twice(meta):  # one part named twice: the dict keeps one, the buffer would carry both
        (entries,) = meta["layout"].values()
        entries[1][0] = entries[0][0]

    with pytest.raises(ValueError, match="expected the"):
        Link().decode(_tampered(wire, twice), update)
    lossy = Link.from_specs([{"name": "int8"}])
    assert type(lossy.decode(lossy.encode(update, {}, torch.Generator())[0], update)) is dict


def test_a_tiled_dict_is_read_only_and_pickles_as_a_plain_dict():
    import pickle

    from fedtune.core.types import Tiled

    buffer = torch.arange(6.0)
    tiled = Tiled({"a": buffer[:2], "b": buffer[2:]}, buffer)
    for change in (
        lambda t: t.__setitem__("a", torch.zeros(2)),
        lambda t: t.update(a=torch.zeros(2)),
        lambda t: t.pop("a"),
        lambda t: t.__delitem__("a"),
        lambda t: t.setdefault("c", torch.zeros(1)),
        lambda t: t.clear(),
    ):
        with pytest.raises(TypeError, match="read-only"):
            change(tiled)
    back = pickle.loads(pickle.dumps(tiled))
    assert type(back) is dict and all(torch.equal(back[k], tiled[k]) for k in tiled)
    copy = dict(tiled)
    copy["a"] = torch.zeros(2)  # a plain copy can change
