"""Sparsification: keep the k largest-magnitude entries (top-k) or k random entries (random-k)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fedtune.codecs.base import PerTensorCodec, check_fraction, dtype_from_name, fraction_count, tensor_info
from fedtune.core.types import Params


def _index_dtype(n: int) -> torch.dtype:
    """The narrowest signed int dtype that holds indices 0..n-1 (a LoRA factor's 4,608 entries: int16)."""
    if n <= 2**15:
        return torch.int16
    return torch.int32 if n <= 2**31 else torch.int64


def _scatter(values: torch.Tensor, idx: torch.Tensor, info: dict) -> torch.Tensor:
    """Values (k,) at flat positions idx (k,) of a zero tensor with the recorded shape and dtype."""
    shape = torch.Size(info["shape"])
    flat = torch.zeros(shape.numel(), dtype=dtype_from_name(info["dtype"]), device=values.device)  # (n,)
    flat[idx.to(device=values.device, dtype=torch.long)] = values.to(flat.dtype)
    return flat.reshape(shape)


@dataclass(frozen=True)
class TopK(PerTensorCodec):
    """Keep k = max(1, ceil(fraction * numel)) largest |x| per float tensor (flattened).

    Sends ``k#values`` (original dtype) and ``k#indices`` (sorted; int16 up to 2**15 entries, else int32,
    int64 past 2**31).
    Error: ||x - x̂||² <= (1 - k/n) ||x||².
    """

    fraction: float = 0.1
    name: ClassVar[str] = "topk"
    parts = ("values", "indices")

    def __post_init__(self) -> None:
        check_fraction("topk fraction", self.fraction)

    def describe(self) -> str:
        return f"topk({self.fraction:g})"

    def encode_one(self, t: torch.Tensor, gen: torch.Generator) -> tuple[Params, dict]:
        flat = t.detach().reshape(-1)  # (n,)
        k = fraction_count(self.fraction, flat.numel())
        idx = flat.abs().float().topk(k, sorted=False).indices.sort().values  # (k,)
        return {"values": flat[idx].contiguous(), "indices": idx.to(_index_dtype(flat.numel()))}, {}

    def decode_one(self, parts: Params, info: dict) -> torch.Tensor:
        return _scatter(parts["values"], parts["indices"], info)


@dataclass(frozen=True)
class RandomK(PerTensorCodec):
    """Keep k = max(1, ceil(fraction * numel)) entries drawn uniformly without replacement.

    Only ``k#values`` is sent: encode draws one seed per call from ``gen`` into the meta, and both sides
    draw the indices from a fresh generator with that seed, over the keys in sorted order. The values are
    *not* rescaled by n/k, so the decoded update is biased (scaled by k/n in expectation): use with error
    feedback, which sends the dropped mass in later rounds.
    """

    fraction: float = 0.1
    name: ClassVar[str] = "randk"
    parts = ("values",)

    def __post_init__(self) -> None:
        check_fraction("randk fraction", self.fraction)

    def describe(self) -> str:
        return f"randk({self.fraction:g})"

    def _indices(self, shapes: dict[str, list[int]], seed: int) -> dict[str, torch.Tensor]:
        """Per key, the k flat indices (k,) drawn from a generator seeded with ``seed`` (sorted key order)."""
        g = torch.Generator().manual_seed(seed)
        out = {}
        for k in sorted(shapes):
            n = torch.Size(shapes[k]).numel()
            out[k] = torch.randperm(n, generator=g)[: fraction_count(self.fraction, n)]
        return out

    def encode(self, tensors: Params, gen: torch.Generator) -> tuple[Params, dict]:
        seed = int(torch.randint(0, 2**53, (1,), generator=gen).item())
        chosen = [k for k, t in tensors.items() if self.applies(t)]
        idx = self._indices({k: list(tensors[k].shape) for k in chosen}, seed)
        out: Params = {}
        for k, t in tensors.items():
            if k not in idx:
                out[k] = t
                continue
            name = f"{k}#values"
            if name in tensors:
                raise ValueError(f"codec output key {name!r} collides with an input key")
            out[name] = t.detach().reshape(-1)[idx[k].to(t.device)].contiguous()
        return out, {"seed": seed, "keys": {k: tensor_info(tensors[k]) for k in chosen}}

    def decode(self, tensors: Params, meta: dict) -> Params:
        keys: dict[str, dict] = meta["keys"]
        idx = self._indices({k: info["shape"] for k, info in keys.items()}, meta["seed"])
        out: Params = {}
        for name, t in tensors.items():
            src = name.removesuffix("#values")
            if src == name or src not in keys:
                out[name] = t
            elif t.numel() != idx[src].numel():
                raise ValueError(f"randk: {name!r} has {t.numel()} values, the seed gives {idx[src].numel()} indices")
            else:
                out[src] = _scatter(t, idx[src], keys[src])
        absent = [k for k in keys if k not in out]
        if absent:
            raise ValueError(f"randk: cannot decode {absent[:3]}: no values received")
        return out
