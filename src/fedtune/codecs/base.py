"""The codec protocol, a shared per-tensor helper, and ``Chain`` (stages + optional error feedback).

A codec maps named tensors to named tensors plus a JSON-able meta dict and back (lossily). Derived
keys are ``<source key>#<part>`` (e.g. ``...lora_A.weight#q``); '#' never occurs in parameter names,
so each stage can tell its own outputs from tensors it passed through. Chains nest the suffixes:
``topk -> int8`` sends ``k#values#q``, ``k#values#scale`` and ``k#indices``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from fedtune.core.types import Params

SEP = "#"


class Codec(Protocol):
    """One stateless, pure compression stage."""

    @property
    def name(self) -> str:
        """Registry name: fp16, bf16, int8, int4, topk, randk, lowrank or block_dropout."""
        ...

    def encode(self, tensors: Params, gen: torch.Generator) -> tuple[Params, dict]: ...

    def decode(self, tensors: Params, meta: dict) -> Params: ...

    def describe(self) -> str: ...


def payload_bytes(tensors: Params) -> int:
    """Raw tensor bytes (values, indices, scales); the safetensors header is counted elsewhere."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def check_declared_shapes(meta: object, max_numel: int) -> None:
    """ValueError unless every ``"shape"`` the meta declares (tensors a codec will allocate on decode:
    top-k and block-dropout zeros, random-k permutations, low-rank products) is a list of
    non-negative ints holding at most ``max_numel`` values: the receiver's largest expected tensor.
    Checked before any allocation, so a few bytes of meta cannot ask for gigabytes."""
    stack = [meta]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "shape" in node:
                shape = node["shape"]
                if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
                    raise ValueError(f"codec meta declares shape {str(shape)[:60]}: not a list of sizes")
                if math.prod(shape) > max_numel:
                    raise ValueError(
                        f"codec meta declares a {shape} tensor ({math.prod(shape):,} values); "
                        f"the largest this receiver expects has {max_numel:,}"
                    )
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in codec meta")
    return dtype


def tensor_info(t: torch.Tensor) -> dict:
    """What decode needs to restore a tensor's shape and dtype (JSON-able)."""
    return {"shape": list(t.shape), "dtype": dtype_name(t.dtype)}


def is_float(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.numel() > 0


def fraction_count(fraction: float, n: int) -> int:
    """max(1, ceil(fraction * n)), robust to float noise (0.07 * 100 -> 7, not 8), capped at n."""
    return min(n, max(1, math.ceil(fraction * n - 1e-9)))


def check_fraction(what: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < value <= 1.0:
        raise ValueError(f"{what} must be a number in (0, 1], got {value!r}")


class PerTensorCodec:
    """Shared encode/decode for codecs that replace each applicable tensor ``k`` by parts ``k#<part>``.

    Subclasses set ``parts`` and implement ``applies``, ``encode_one`` and ``decode_one``; the stage meta
    is ``{"keys": {k: {"shape": [...], "dtype": "...", **extra}}}`` for the transformed keys only.
    """

    parts: ClassVar[tuple[str, ...]]

    def applies(self, t: torch.Tensor) -> bool:
        return is_float(t)

    def encode_one(self, t: torch.Tensor, gen: torch.Generator) -> tuple[Params, dict]:
        """-> ({part: tensor}, extra meta for this key)."""
        raise NotImplementedError

    def decode_one(self, parts: Params, info: dict) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, tensors: Params, gen: torch.Generator) -> tuple[Params, dict]:
        out: Params = {}
        keys: dict[str, dict] = {}
        for k, t in tensors.items():
            if not self.applies(t):
                out[k] = t
                continue
            parts, extra = self.encode_one(t, gen)
            for part, p in parts.items():
                name = f"{k}{SEP}{part}"
                if name in tensors or name in out:
                    raise ValueError(f"codec output key {name!r} collides with an input key")
                out[name] = p
            keys[k] = {**tensor_info(t), **extra}
        return out, {"keys": keys}

    def decode(self, tensors: Params, meta: dict) -> Params:
        keys: dict[str, dict] = meta["keys"]
        produced = {f"{k}{SEP}{part}": k for k in keys for part in self.parts}
        out: Params = {}
        for name, t in tensors.items():
            src = produced.get(name)
            if src is None:
                out[name] = t
            elif src not in out:
                missing = [p for p in self.parts if f"{src}{SEP}{p}" not in tensors]
                if missing:
                    raise ValueError(f"cannot decode {src!r}: missing parts {missing}")
                out[src] = self.decode_one({p: tensors[f"{src}{SEP}{p}"] for p in self.parts}, keys[src])
        absent = [k for k in keys if k not in out]
        if absent:
            raise ValueError(f"cannot decode {absent[:3]}{'...' if len(absent) > 3 else ''}: no parts received")
        return out


@dataclass(frozen=True)
class Packed:
    """What goes on the wire: the encoded tensors and ``{"codecs": [describe...], "stages": [meta...]}``."""

    tensors: Params
    meta: dict


class Chain:
    """Codec stages applied in order on encode and in reverse on decode, with optional error feedback.

    Error feedback (Seide et al. 2014; Karimireddy et al. 2019, EF-SGD): the client keeps the residual
    ``e`` (float32, by tensor name in the residual state it passes in), sends ``C(x + e)`` and keeps
    ``e' = x + e - D(C(x + e))``, so what compression drops is sent later instead of lost.
    """

    def __init__(self, stages: Sequence[Codec], error_feedback: bool = False):
        self.stages: tuple[Codec, ...] = tuple(stages)
        self.error_feedback = error_feedback

    def describe(self) -> str:
        text = " -> ".join(s.describe() for s in self.stages) or "none"
        return text + (" (+error feedback)" if self.error_feedback else "")

    def __repr__(self) -> str:
        return f"Chain({self.describe()!r})"

    def _encode(self, tensors: Params, gen: torch.Generator) -> Packed:
        metas = []
        for stage in self.stages:
            tensors, meta = stage.encode(tensors, gen)
            metas.append(meta)
        return Packed(dict(tensors), {"codecs": [s.describe() for s in self.stages], "stages": metas})

    def encode(self, update: Params, state: Params, gen: torch.Generator) -> tuple[Packed, Params]:
        """-> (packed update, new residuals by name); the state is returned as is without error feedback."""
        if not self.error_feedback:
            return self._encode(update, gen), state
        corrected32: Params = {}  # float32 x + e, per float key
        to_send: Params = {}
        for k, x in update.items():
            if not x.is_floating_point():
                to_send[k] = x
                continue
            e = state.get(k)  # missing = zeros
            if e is not None and e.shape != x.shape:
                raise ValueError(f"residual for {k!r} has shape {tuple(e.shape)}, update has {tuple(x.shape)}")
            c = x.float() if e is None else x.float() + e.to(device=x.device, dtype=torch.float32)
            corrected32[k] = c
            to_send[k] = c.to(x.dtype)
        packed = self._encode(to_send, gen)
        decoded = self.decode(packed)
        new_state = dict(state)  # residuals of keys absent from this update kept as is
        for k, c in corrected32.items():
            new_state[k] = c - decoded[k].float()  # float32
        return packed, new_state

    def decode(self, packed: Packed, max_numel: int | None = None) -> Params:
        """The decoded tensors; with ``max_numel``, a meta that declares a larger tensor is refused first."""
        codecs = packed.meta.get("codecs", [])
        stages = packed.meta.get("stages", [])
        if len(stages) != len(self.stages) or len(codecs) != len(self.stages):
            raise ValueError(
                f"packed update has {len(stages)} codec stage(s) {codecs}, "
                f"but this chain has {len(self.stages)}: {self.describe()!r}"
            )
        for i, (got, stage) in enumerate(zip(codecs, self.stages, strict=True)):
            if got != stage.describe():
                raise ValueError(f"codec stage {i} mismatch: packed with {got!r}, this chain has {stage.describe()!r}")
        if max_numel is not None:
            check_declared_shapes(stages, max_numel)
        tensors = dict(packed.tensors)
        for stage, meta in zip(reversed(self.stages), reversed(stages), strict=True):
            tensors = stage.decode(tensors, meta)
        return tensors
