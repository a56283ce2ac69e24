"""What both sides of FedKSeed agree on: the order a step's direction is drawn in, the digest of the weights,
a round's steps as (direction seed, amount) pairs, and FedKSeed-Pro's candidate probabilities."""

from __future__ import annotations

import hashlib

import numpy as np
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


class Amplitudes:
    """FedKSeed-Pro's importance of each candidate from the global steps replayed so far: ψ_j the mean of
    |amount| over the rounds that used candidate j, with one 0 counted first (so an unused candidate has
    ψ_j = 0), and p = softmax((ψ - min ψ) / (max ψ - min ψ)): the most important candidate at most e times
    as likely as the least."""

    def __init__(self, k: int):
        self.total = np.zeros(k, dtype=np.float64)  # Σ |amount| per candidate
        self.rounds = np.ones(k, dtype=np.float64)  # rounds that used it, plus the initial 0

    def add(self, index: torch.Tensor, amount: torch.Tensor) -> None:
        """Count global steps (each round's pairs name a candidate once)."""
        j = index.to(torch.int64).numpy()
        np.add.at(self.total, j, np.abs(amount.to(torch.float64).numpy()))
        np.add.at(self.rounds, j, 1.0)

    def probabilities(self) -> np.ndarray:
        """(K,) float64, summing to 1."""
        psi = self.total / self.rounds
        scaled = (psi - psi.min()) / (psi.max() - psi.min() + 1e-10)
        e = np.exp(scaled - scaled.max())
        return e / e.sum()
