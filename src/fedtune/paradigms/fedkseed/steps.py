"""What both sides of FedKSeed agree on: the order a step's direction is drawn in, the digest of the weights,
and a round's steps as (direction seed, amount) pairs."""

from __future__ import annotations

import hashlib

import torch

from fedtune.core.types import Params


def ordered(params: Params) -> list[torch.Tensor]:
    """The tensors a step moves, in the order its direction is drawn (by name)."""
    return [params[k] for k in sorted(params)]


def digest(params: Params) -> str:
    """sha256 of the weights by name: what a client's rebuilt weights must match."""
    h = hashlib.sha256()
    for k in sorted(params):
        h.update(k.encode() + b"\0" + params[k].detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def pairs(index: torch.Tensor, amount: torch.Tensor, candidates: list[int]) -> list[tuple[int, float]]:
    """(direction seed, amount) of each step, in order."""
    return [(candidates[j], a) for j, a in zip(index.tolist(), amount.tolist(), strict=True)]
