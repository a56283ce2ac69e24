"""FedOBD-style block dropout: send only the layers (blocks) that changed most this round."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch

from fedtune.codecs.base import check_fraction, dtype_from_name, fraction_count, tensor_info
from fedtune.core.types import Params

_INT = re.compile(r"\d+")


def layer_component(key: str) -> int | None:
    """Which dot-separated component of a parameter name is its first integer, the layer its block is
    ('...layers.3.q_proj.weight' -> the component '3'); None when it has none. The wire names tensors by it."""
    return next((i for i, part in enumerate(key.split(".")) if _INT.fullmatch(part)), None)


def block_id(key: str) -> str:
    """The key's prefix up to its first integer path component ('...layers.3.q_proj.weight' -> '...layers.3').

    A key with no integer component is its own block.
    """
    at = layer_component(key)
    return key if at is None else ".".join(key.split(".")[: at + 1])


def block_scores(tensors: Params) -> dict[str, float]:
    """Block id -> mean squared entry over its floating-point tensors (0 for a block without any)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for k, t in tensors.items():
        b = block_id(k)
        sums.setdefault(b, 0.0)
        counts.setdefault(b, 0)
        if t.is_floating_point():
            sums[b] += float(t.detach().double().square().sum())
            counts[b] += t.numel()
    return {b: sums[b] / counts[b] if counts[b] else 0.0 for b in sums}


@dataclass(frozen=True)
class BlockDropout:
    """Keep the ceil(keep_fraction * n_blocks) (at least 1) blocks of highest mean squared change.

    Blocks group keys by layer (see ``block_id``); ties break by block name. Kept tensors are sent
    unchanged (all dtypes); the meta lists the dropped keys' shapes and dtypes, decoded as zeros.
    Scores use the float tensors only, so put this stage first in a chain (before quantisation).
    """

    keep_fraction: float = 0.5
    name: ClassVar[str] = "block_dropout"

    def __post_init__(self) -> None:
        check_fraction("block_dropout keep_fraction", self.keep_fraction)

    def describe(self) -> str:
        return f"block_dropout({self.keep_fraction:g})"

    def kept_blocks(self, tensors: Params) -> set[str]:
        scores = block_scores(tensors)
        ranked = sorted(scores, key=lambda b: (-scores[b], b))
        return set(ranked[: fraction_count(self.keep_fraction, len(ranked))]) if ranked else set()

    def encode(self, tensors: Params, gen: torch.Generator) -> tuple[Params, dict]:
        kept = self.kept_blocks(tensors)
        out = {k: t for k, t in tensors.items() if block_id(k) in kept}
        dropped = {k: tensor_info(t) for k, t in tensors.items() if block_id(k) not in kept}
        return out, {"dropped": dropped}

    def decode(self, tensors: Params, meta: dict) -> Params:
        out = dict(tensors)
        for k, info in meta["dropped"].items():
            if k in out:
                raise ValueError(f"block_dropout: {k!r} is both sent and listed as dropped")
            out[k] = torch.zeros(info["shape"], dtype=dtype_from_name(info["dtype"]))
        return out
