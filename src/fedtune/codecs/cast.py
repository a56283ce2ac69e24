"""Cast floating-point tensors to float16 or bfloat16 (half the bytes of float32)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from fedtune.codecs.base import PerTensorCodec, dtype_from_name
from fedtune.core.types import Params

FP16_MAX = 65504.0
_DTYPES = {"float16": ("fp16", torch.float16), "bfloat16": ("bf16", torch.bfloat16)}


@dataclass(frozen=True)
class Cast(PerTensorCodec):
    """``x.to(dtype)``; decode casts back to the recorded dtype.

    float16 clamps to ±65504 first (so ±inf and out-of-range values become ±65504, not inf);
    bfloat16 has float32's range and needs no clamp. Tensors already in ``dtype`` pass through.
    """

    dtype: Literal["float16", "bfloat16"] = "float16"
    parts = ("half",)

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"Cast dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")

    @property
    def name(self) -> str:
        return _DTYPES[self.dtype][0]

    def describe(self) -> str:
        return self.name

    def applies(self, t: torch.Tensor) -> bool:
        return super().applies(t) and t.dtype != _DTYPES[self.dtype][1]

    def encode_one(self, t: torch.Tensor, gen: torch.Generator) -> tuple[Params, dict]:
        if self.dtype == "float16":
            t = t.clamp(-FP16_MAX, FP16_MAX)
        return {"half": t.to(_DTYPES[self.dtype][1]).contiguous()}, {}

    def decode_one(self, parts: Params, info: dict) -> torch.Tensor:
        return parts["half"].to(dtype_from_name(info["dtype"]))
