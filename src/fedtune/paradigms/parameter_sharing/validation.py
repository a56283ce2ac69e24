"""Reject a client update before it can reach the global model; say which client and why."""

from __future__ import annotations

import math

import torch

from fedtune.aggregation.clipping import fused_norm, nonfinite_tensors
from fedtune.types import Params

Signature = dict[str, tuple[torch.Size, torch.dtype]]  # name -> (shape, dtype)


def signature(params: Params) -> Signature:
    """What an update to ``params`` must look like; worked out once a round, not once a reply."""
    return {k: (v.shape, v.dtype) for k, v in params.items()}


def update_problem(
    delta: Params, params: Params, max_norm: float | None = None, expected: Signature | None = None
) -> str | None:
    """None if the update fits the global params (keys, shapes, dtypes, finite, norm bound), else the reason.
    ``expected``: ``signature(params)``, when the caller has it already."""
    if delta.keys() != params.keys():
        missing, extra = sorted(params.keys() - delta.keys()), sorted(delta.keys() - params.keys())
        return f"keys differ from the global adapter (missing {missing[:2]}, unexpected {extra[:2]})"
    if {k: (v.shape, v.dtype) for k, v in delta.items()} != (signature(params) if expected is None else expected):
        for k, v in delta.items():  # which one
            if v.shape != params[k].shape:
                return f"{k}: shape {tuple(v.shape)}, expected {tuple(params[k].shape)}"
            if v.dtype != params[k].dtype:
                return f"{k}: dtype {v.dtype}, expected {params[k].dtype}"
    norm = fused_norm(delta)  # one pass gives both: a NaN or Inf anywhere makes it non-finite
    if not math.isfinite(norm):
        bad = nonfinite_tensors(delta)
        if bad:
            return f"{bad[0]}: contains NaN or Inf"
        norm = math.inf  # finite values whose squares overflow float32
    if max_norm is not None and norm > max_norm:
        return f"update norm {norm:.4g} exceeds aggregation.max_update_norm={max_norm:g}"
    return None
