"""Reject a client update before it can reach the global model; say which client and why."""

from __future__ import annotations

import torch

from fedtune.types import Params


def update_problem(delta: Params, params: Params) -> str | None:
    """None if the update fits the global params (keys, shapes, dtypes, finite), else the reason."""
    if delta.keys() != params.keys():
        missing, extra = sorted(params.keys() - delta.keys()), sorted(delta.keys() - params.keys())
        return f"keys differ from the global adapter (missing {missing[:2]}, unexpected {extra[:2]})"
    for k, v in delta.items():
        if v.shape != params[k].shape:
            return f"{k}: shape {tuple(v.shape)}, expected {tuple(params[k].shape)}"
        if v.dtype != params[k].dtype:
            return f"{k}: dtype {v.dtype}, expected {params[k].dtype}"
        if not torch.isfinite(v).all():
            return f"{k}: contains NaN or Inf"
    return None
