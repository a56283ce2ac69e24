"""Symmetric uniform quantisation to int8, or int4 packed two values per byte."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from fedtune.codecs.base import PerTensorCodec, dtype_from_name
from fedtune.core.types import Params

_LEVELS = {8: 127, 4: 7}


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """int levels in [-7, 7] (any shape, n values) -> uint8 (ceil(n/2),): byte i = (q[2i]+8) | (q[2i+1]+8) << 4."""
    v = (q.reshape(-1) + 8).to(torch.uint8)  # (n,) in 1..15
    if v.numel() % 2:
        v = torch.cat([v, v.new_zeros(1)])
    pairs = v.reshape(-1, 2)  # (ceil(n/2), 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 (ceil(n/2),) -> int32 levels (n,) in [-7, 7]."""
    pairs = torch.stack([packed & 0x0F, packed >> 4], dim=1)  # (ceil(n/2), 2)
    return pairs.reshape(-1)[:n].to(torch.int32) - 8


@dataclass(frozen=True)
class Quantize(PerTensorCodec):
    """q = round(x / scale) in [-L, L], L = 127 (8 bits) or 7 (4 bits); scale = max|x| / L (float32).

    ``per="channel"``: for a matrix (m, n) (higher ranks seen as (m, rest)), one scale per slice along the
    shorter side: per row when m <= n, else per column. For LoRA that is one scale per rank component
    (A (r, in): r rows; B (out, r): r columns) rather than 4 bytes per 8-value row of B. 1-D: one per tensor.
    ``rounding="stochastic"``: q = floor(x / scale + u), u ~ U[0, 1) from ``gen``, so E[q * scale] = x.
    Error bound per element: scale / 2 (nearest), < scale (stochastic). A zero row has scale 0 and decodes
    to 0. Sends ``k#q`` (int8, or uint8 nibble-packed for 4 bits) and ``k#scale`` (float32, (rows,) or (1,)).
    """

    bits: Literal[8, 4] = 8
    per: Literal["tensor", "channel"] = "channel"
    rounding: Literal["nearest", "stochastic"] = "nearest"
    parts = ("q", "scale")

    def __post_init__(self) -> None:
        if self.bits not in _LEVELS or isinstance(self.bits, bool):
            raise ValueError(f"Quantize bits must be one of {sorted(_LEVELS)}, got {self.bits!r}")
        if self.per not in ("tensor", "channel"):
            raise ValueError(f"Quantize per must be 'tensor' or 'channel', got {self.per!r}")
        if self.rounding not in ("nearest", "stochastic"):
            raise ValueError(f"Quantize rounding must be 'nearest' or 'stochastic', got {self.rounding!r}")

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    def describe(self) -> str:
        return f"{self.name}/{self.per}/{self.rounding}"

    def encode_one(self, t: torch.Tensor, gen: torch.Generator) -> tuple[Params, dict]:
        levels = _LEVELS[self.bits]
        x = _channels(t.detach().float(), self.per)  # (channels, values per channel)
        scale = x.abs().amax(dim=1) / levels  # (rows,)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # zero rows: x = 0, so q = 0
        if self.rounding == "nearest":
            q = torch.round(x / safe[:, None])  # (rows, cols)
        else:  # float64 so y + u cannot round up across an integer
            y = x.double() / safe.double()[:, None]
            u = torch.rand(y.shape, generator=gen, dtype=torch.float64).to(y.device)
            q = torch.floor(y + u)
        q = q.clamp(-levels, levels)  # (channels, len)
        # channel-major: rows, or the columns of a tall matrix such as LoRA B
        packed = q.to(torch.int8).reshape(-1).contiguous() if self.bits == 8 else pack_nibbles(q)
        return {"q": packed, "scale": scale.contiguous()}, {}

    def decode_one(self, parts: Params, info: dict) -> torch.Tensor:
        shape = torch.Size(info["shape"])
        scale = parts["scale"].float()  # (rows,)
        packed = parts["q"]
        q = unpack_nibbles(packed, shape.numel()) if packed.dtype == torch.uint8 else packed.to(torch.int32)
        x = q.reshape(scale.numel(), -1).float() * scale[:, None]  # (channels, len)
        if scale.numel() > 1 and _by_column(shape):
            x = x.T  # back to (m, n)
        return x.reshape(shape).to(dtype_from_name(info["dtype"]))


def _by_column(shape: torch.Size) -> bool:
    """Per-channel scales run along columns when the matrix (m, rest) has fewer columns than rows."""
    m = shape[0]
    return m > shape.numel() // m


def _channels(x: torch.Tensor, per: str) -> torch.Tensor:
    """(channels, len) view of x: one row per scale."""
    if per != "channel" or x.ndim < 2 or x.numel() == 0:
        return x.reshape(1, -1)
    m = x.reshape(x.shape[0], -1)  # (m, n)
    return m.T if _by_column(x.shape) else m
