"""Norm clipping of client updates: a composable step before any combiner (and DP's first half)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fedtune.aggregation.base import Contribution
from fedtune.types import Params


def update_norm(delta: Params) -> float:
    """Global L2 norm over every tensor of an update, summed in key order (dict order varies)."""
    return math.sqrt(sum(float(delta[k].to(torch.float32).pow(2).sum()) for k in sorted(delta)))


def clip_update(delta: Params, max_norm: float) -> Params:
    """Scale the update down to max_norm if it is longer; shorter updates are returned as they are."""
    norm = update_norm(delta)
    if norm <= max_norm:
        return delta
    scale = max_norm / norm
    return {k: (v.to(torch.float32) * scale).to(v.dtype) for k, v in delta.items()}


def clip_contributions(contributions: Sequence[Contribution], max_norm: float) -> list[Contribution]:
    return [c._replace(delta=clip_update(c.delta, max_norm)) for c in contributions]
