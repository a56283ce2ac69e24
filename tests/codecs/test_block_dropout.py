"""BlockDropout: block ids, the highest-scoring blocks kept exactly, the rest decoded as zeros."""

from __future__ import annotations

import math

import pytest
import torch

from fedtune.codecs import BlockDropout
from fedtune.codecs.block_dropout import block_id, block_scores
from tests.codecs.helpers import PREFIX, adapter_update, assert_same_layout, gen


@pytest.mark.parametrize(
    ("key", "block"),
    [
        (f"{PREFIX}.3.self_attn.q_proj.lora_A.weight", f"{PREFIX}.3"),
        (f"{PREFIX}.12.mlp.up_proj.lora_B.weight", f"{PREFIX}.12"),
        ("base_model.model.model.norm.weight", "base_model.model.model.norm.weight"),
        ("h.0.attn.c_attn.lora_A.weight", "h.0"),
        ("layers.1.experts.7.w", "layers.1"),  # the first integer component
        ("a.3b.c", "a.3b.c"),  # '3b' is not an integer
        (f"{PREFIX}.3.self_attn.q_proj.lora_A.weight#values", f"{PREFIX}.3"),  # a chained key
    ],
)
def test_block_id(key, block):
    assert block_id(key) == block


def test_scores_are_mean_squared_change():
    x = {"l.0.a": torch.full((2, 2), 2.0), "l.0.b": torch.zeros(4), "l.1.a": torch.ones(3), "i": torch.ones(2).int()}
    assert block_scores(x) == {"l.0": 2.0, "l.1": 1.0, "i": 0.0}  # (4 * 4) / 8; int tensors do not count


@pytest.mark.parametrize("keep", [0.01, 0.25, 0.5, 0.75, 1.0])
def test_keeps_highest_blocks_exactly(keep):
    update = adapter_update(layers=6)  # layer i changes with scale 0.01 * (i + 1): later layers score higher
    codec = BlockDropout(keep)
    tensors, meta = codec.encode(update, gen())
    decoded = codec.decode(tensors, meta)
    assert_same_layout(decoded, update)
    scores = block_scores(update)
    n_keep = max(1, math.ceil(keep * len(scores) - 1e-9))
    kept = {block_id(k) for k in tensors}
    assert len(kept) == n_keep
    assert min(scores[b] for b in kept) >= max((s for b, s in scores.items() if b not in kept), default=0.0)
    for k, x in update.items():
        if block_id(k) in kept:
            assert tensors[k] is x and torch.equal(decoded[k], x)
        else:
            assert k in meta["dropped"] and torch.equal(decoded[k], torch.zeros_like(x))


def test_ties_break_by_name_and_at_least_one_block():
    x = {f"l.{i}.w": torch.ones(2) for i in (2, 0, 1)}
    tensors, meta = BlockDropout(0.5).encode(x, gen())
    assert set(tensors) == {"l.0.w", "l.1.w"}
    assert meta["dropped"] == {"l.2.w": {"shape": [2], "dtype": "float32"}}
    assert set(BlockDropout(0.01).encode(x, gen())[0]) == {"l.0.w"}


def test_drops_all_dtypes_of_a_block():
    x = {"l.0.w": torch.ones(3), "l.0.w#indices": torch.arange(3, dtype=torch.int32), "l.1.w": 5 * torch.ones(3)}
    codec = BlockDropout(0.5)
    tensors, meta = codec.encode(x, gen())
    assert set(tensors) == {"l.1.w"}
    decoded = codec.decode(tensors, meta)
    assert_same_layout(decoded, x)
    assert torch.equal(decoded["l.0.w#indices"], torch.zeros(3, dtype=torch.int32))


@pytest.mark.parametrize("keep", [0, 1.01, None])
def test_bad_keep_fraction(keep):
    with pytest.raises(ValueError, match="keep_fraction"):
        BlockDropout(keep)
