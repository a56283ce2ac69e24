"""Update-compression codecs: cast, quantise, sparsify, low-rank, block dropout, chained with error feedback.

from fedtune.codecs import build_chain
chain = build_chain([{"name": "topk", "fraction": 0.05}, {"name": "int8"}], error_feedback=True)
packed, state = chain.encode(delta, state, torch.Generator().manual_seed(0))  # client
delta_hat = chain.decode(packed)  # server
"""

from __future__ import annotations

from collections.abc import Sequence

from fedtune.codecs.base import Chain, Codec, Packed, payload_bytes
from fedtune.codecs.block_dropout import BlockDropout
from fedtune.codecs.cast import Cast
from fedtune.codecs.lowrank import LowRank
from fedtune.codecs.quantize import Quantize
from fedtune.codecs.sparsify import RandomK, TopK
from fedtune.core.registry import CODECS as _REGISTRY

CODECS: dict[str, type] = {e.name: _REGISTRY.load(e.name) for e in _REGISTRY}  # name -> codec class


def build_codec(spec: dict) -> Codec:
    """``{"name": "int8", "per": "channel", "rounding": "stochastic"}`` -> ``Quantize(8, "channel", "stochastic")``.

    Options left out take the class defaults (int8/int4: per="channel", rounding="nearest"; topk/randk:
    fraction=0.1; lowrank: rank=4; block_dropout: keep_fraction=0.5). Raises ValueError on unknown names,
    unknown options or bad values.
    """
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"codec spec must be a dict with a 'name' (one of {sorted(CODECS)}), got {spec!r}")
    options = dict(spec)
    name = options.pop("name")
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; allowed: {sorted(CODECS)}")
    entry = _REGISTRY.entry(name)
    allowed = list(entry.options)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for codec {name!r}; allowed: {allowed}")
    return CODECS[name](**options, **entry.fixed)


def build_chain(specs: Sequence[dict], error_feedback: bool = False) -> Chain:
    """A ``Chain`` of ``build_codec(spec)`` stages, in order."""
    stages = []
    for i, spec in enumerate(specs):
        try:
            stages.append(build_codec(spec))
        except ValueError as err:
            raise ValueError(f"codec stage {i}: {err}") from None
    return Chain(stages, error_feedback=error_feedback)


__all__ = [
    "CODECS",
    "BlockDropout",
    "Cast",
    "Chain",
    "Codec",
    "LowRank",
    "Packed",
    "Quantize",
    "RandomK",
    "TopK",
    "build_chain",
    "build_codec",
    "payload_bytes",
]
