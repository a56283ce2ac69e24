"""FedKSeed's messages: the aggregated steps a client has not applied down, its own steps up.

A step is (candidate index j, amount a): the weights move by -a · z(seed_j). Down, ``replay`` carries
the global steps of rounds ``since + 1 .. round - 1`` (``counts`` per round, then the pairs in order) and
the digest the weights must have after them; up, the client's round as one amount per candidate index it
used (Σ η_t g_t over its steps with that index). No weights cross the wire.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

NONE_I = torch.zeros(0, dtype=torch.int32)
NONE_F = torch.zeros(0, dtype=torch.float32)


@dataclass(frozen=True)
class KSeedRequest:
    """Server -> client: bring the weights from round ``since`` to ``digest`` with these steps, then train."""

    KIND: ClassVar[str] = "fedkseed_train"
    TENSORS: ClassVar[tuple[str, ...]] = ("counts", "index", "amount")
    round: int
    since: int  # the round whose global weights the steps start from
    digest: str  # sha256 of the global weights after them (those of round - 1)
    counts: torch.Tensor = field(default_factory=lambda: NONE_I)  # (R,) int32: steps of rounds since+1 .. round-1
    index: torch.Tensor = field(default_factory=lambda: NONE_I)  # (Σ counts,) int32 candidate indices
    amount: torch.Tensor = field(default_factory=lambda: NONE_F)  # (Σ counts,) float32: w -= amount · z(seed)


@dataclass(frozen=True)
class KSeedReply:
    """Client -> server: its round's steps, or (``behind``) the round its process holds, to be sent from."""

    KIND: ClassVar[str] = "fedkseed_reply"
    TENSORS: ClassVar[tuple[str, ...]] = ("index", "amount")
    round: int
    index: torch.Tensor = field(default_factory=lambda: NONE_I)  # (M,) int32, strictly increasing
    amount: torch.Tensor = field(default_factory=lambda: NONE_F)  # (M,) float32: Σ η_t g_t with that index
    num_examples: int = 0
    num_tokens: int = 0
    steps: int = 0
    train_loss: float = 0.0
    local_train_s: float = 0.0
    peak_bytes: int = 0
    flops: float = 0.0  # analytic FLOPs of its round's forward passes (client.cost)
    trained_tokens: int = 0
    status: Literal["ok", "behind", "diverged"] = "ok"
    holds: int = 0  # behind: the round whose global weights it holds
    error: str | None = None
