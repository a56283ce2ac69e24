"""Norm clipping of client updates: a composable step before any combiner (and DP's first half)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fedtune.aggregation.base import Contribution
from fedtune.aggregation.flat import flat_of
from fedtune.core.types import Params


def update_norm(delta: Params) -> float:
    """Global L2 norm over every tensor of an update, summed in key order (dict order varies)."""
    return math.sqrt(sum(float(delta[k].to(torch.float32).pow(2).sum()) for k in sorted(delta)))


def fused_norm(params: Params) -> float:
    """L2 norm over every float tensor in one fused pass (float32); inf or nan if any value is not
    finite, or if the squares overflow: then ``not_finite`` tells which.

    Tensors that are views tiling one buffer (an update decoded without codecs, the global params
    after a flat FedAvg step: ``aggregation.flat``) are normed as that buffer: one kernel instead of
    one per tensor.
    """
    buffer = flat_of(params)
    if buffer is not None and buffer.dtype == torch.float32:  # BLAS dot: 2x a norm kernel; NaN/Inf propagate
        return math.sqrt(float(torch.dot(buffer, buffer)))
    if buffer is not None and buffer.is_floating_point():
        return float(torch.linalg.vector_norm(buffer, dtype=torch.float32))
    floats = [t if t.dtype == torch.float32 else t.float() for t in params.values() if t.is_floating_point()]
    if not floats:
        return 0.0
    buffer = _tiled_buffer(floats)
    if buffer is not None:
        return float(torch.linalg.vector_norm(buffer))
    return float(torch.nn.utils.get_total_norm(floats))


def _tiled_buffer(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The flat span of one storage that ``tensors`` cover exactly in any order (contiguous views, no
    gaps, no overlaps), or None."""
    first = tensors[0]
    ptr = first.untyped_storage().data_ptr()
    spans = []
    for t in tensors:
        if t.dtype != first.dtype or not t.is_contiguous() or t.untyped_storage().data_ptr() != ptr:
            return None
        spans.append((t.storage_offset(), t.numel()))
    spans.sort()
    start = end = spans[0][0]
    for offset, n in spans:
        if offset != end:
            return None
        end += n
    return first.as_strided((end - start,), (1,), start)  # (sum of numels,)


def not_finite(params: Params) -> list[str]:
    """Names of the tensors holding NaN or Inf, in key order; a fused pass first, so a finite update
    costs one read (20x faster than a check per tensor for a 240-tensor adapter)."""
    return [] if math.isfinite(fused_norm(params)) else nonfinite_tensors(params)


def nonfinite_tensors(params: Params) -> list[str]:
    """Names of the tensors holding NaN or Inf, in key order, checked one by one."""
    return [k for k in sorted(params) if params[k].is_floating_point() and not torch.isfinite(params[k]).all()]


def clip_update(delta: Params, max_norm: float) -> Params:
    """Scale the update down to max_norm if it is longer; shorter updates are returned as they are."""
    norm = update_norm(delta)
    if norm <= max_norm:
        return delta
    scale = max_norm / norm
    return {k: (v.to(torch.float32) * scale).to(v.dtype) for k, v in delta.items()}


def clip_contributions(contributions: Sequence[Contribution], max_norm: float) -> list[Contribution]:
    return [c._replace(delta=clip_update(c.delta, max_norm)) for c in contributions]
