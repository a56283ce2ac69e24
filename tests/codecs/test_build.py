"""build_codec / build_chain: names, defaults, and ValueErrors that name the problem."""

from __future__ import annotations

import pytest

from fedtune.codecs import CODECS, BlockDropout, Cast, LowRank, Quantize, RandomK, TopK, build_chain, build_codec


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"name": "fp16"}, Cast("float16")),
        ({"name": "bf16"}, Cast("bfloat16")),
        ({"name": "int8"}, Quantize(8, "channel", "nearest")),
        ({"name": "int8", "per": "channel", "rounding": "stochastic"}, Quantize(8, "channel", "stochastic")),
        ({"name": "int4", "per": "tensor"}, Quantize(4, "tensor", "nearest")),
        ({"name": "topk"}, TopK(0.1)),
        ({"name": "topk", "fraction": 0.05}, TopK(0.05)),
        ({"name": "randk", "fraction": 0.2}, RandomK(0.2)),
        ({"name": "lowrank"}, LowRank(4)),
        ({"name": "lowrank", "rank": 8}, LowRank(8)),
        ({"name": "block_dropout"}, BlockDropout(0.5)),
        ({"name": "block_dropout", "keep_fraction": 0.25}, BlockDropout(0.25)),
    ],
)
def test_build_codec(spec, expected):
    codec = build_codec(spec)
    assert codec == expected and codec.name == spec["name"]


def test_registry_names():
    assert set(CODECS) == {"fp16", "bf16", "int8", "int4", "topk", "randk", "lowrank", "block_dropout"}
    assert all(build_codec({"name": n}).name == n for n in CODECS)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"name": "int2"}, r"unknown codec 'int2'; allowed: \['bf16', 'block_dropout'"),
        ({"fraction": 0.1}, "'name'"),
        ("topk", "'name'"),
        ({"name": "topk", "k": 10}, r"unknown option\(s\) \['k'\] for codec 'topk'; allowed: \['fraction'\]"),
        ({"name": "int8", "bits": 4}, r"unknown option\(s\) \['bits'\].*allowed: \['per', 'rounding'\]"),
        ({"name": "fp16", "dtype": "bfloat16"}, r"unknown option\(s\) \['dtype'\]"),
        ({"name": "int8", "per": "row"}, "per must be 'tensor' or 'channel', got 'row'"),
        ({"name": "int4", "rounding": "floor"}, "rounding must be 'nearest' or 'stochastic'"),
        ({"name": "topk", "fraction": 0}, r"topk fraction must be a number in \(0, 1\]"),
        ({"name": "randk", "fraction": 2.0}, "randk fraction"),
        ({"name": "lowrank", "rank": 0}, "rank must be an integer >= 1"),
        ({"name": "block_dropout", "keep_fraction": -1}, "keep_fraction"),
    ],
)
def test_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        build_codec(spec)


def test_build_chain():
    chain = build_chain([{"name": "topk", "fraction": 0.05}, {"name": "int8"}], error_feedback=True)
    assert chain.stages == (TopK(0.05), Quantize(8)) and chain.error_feedback
    assert chain.describe() == "topk(0.05) -> int8/channel/nearest (+error feedback)"
    with pytest.raises(ValueError, match="codec stage 1: unknown codec 'zip'"):
        build_chain([{"name": "fp16"}, {"name": "zip"}], error_feedback=False)
