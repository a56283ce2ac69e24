"""Low-rank approximation of 2-D tensors by truncated SVD (optimal in Frobenius norm, Eckart–Young)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fedtune.codecs.base import PerTensorCodec, dtype_from_name, is_float
from fedtune.core import linalg
from fedtune.core.types import Params


@dataclass(frozen=True)
class LowRank(PerTensorCodec):
    """x (m, n) ≈ u @ v with u = U[:, :r] * S[:r] (m, r), v = Vh[:r] (r, n), r = min(rank, m, n).

    Applies only to 2-D float tensors where it saves bytes, (m + n) * r < m * n; others pass through.
    Sends ``k#u`` and ``k#v`` in the original dtype. Error: ||x - x̂||_F = sqrt(sum of discarded S²).
    """

    rank: int = 4
    name: ClassVar[str] = "lowrank"
    parts = ("u", "v")

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lowrank rank must be an integer >= 1, got {self.rank!r}")

    def describe(self) -> str:
        return f"lowrank({self.rank})"

    def applies(self, t: torch.Tensor) -> bool:
        if not is_float(t) or t.ndim != 2:
            return False
        m, n = t.shape
        return (m + n) * min(self.rank, m, n) < m * n

    def encode_one(self, t: torch.Tensor, gen: torch.Generator) -> tuple[Params, dict]:
        r = min(self.rank, *t.shape)
        u, s, vh = linalg.svd(t.detach().float())  # (m, p), (p,), (p, n); p = min(m, n)
        return {"u": (u[:, :r] * s[:r]).to(t.dtype).contiguous(), "v": vh[:r].to(t.dtype).contiguous()}, {}

    def decode_one(self, parts: Params, info: dict) -> torch.Tensor:
        u, v = parts["u"], parts["v"]  # (m, r), (r, n)
        if u.dim() != 2 or v.dim() != 2 or u.shape[1] != v.shape[0] or [u.shape[0], v.shape[1]] != info["shape"]:
            raise ValueError(f"lowrank: factors {tuple(u.shape)} and {tuple(v.shape)} do not make {info['shape']}")
        return (u.float() @ v.float()).to(dtype_from_name(info["dtype"]))  # (m, n)
