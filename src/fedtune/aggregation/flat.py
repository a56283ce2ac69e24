"""Named tensors that are views tiling one flat buffer, so that arithmetic over a whole adapter runs as
one kernel instead of one per tensor (a SmolLM2 LoRA adapter has 240 tensors; FedAvg of 4 clients went
from 6.7 ms to about 1 ms on 2 CPU cores).

An update decoded without codecs is such a set of views (``wire.link.Link.decode``), in its packed
order; the server optimizers write the new global params with ``packed_like`` in the order of the
round's step, so that from the second round on FedAvg's mean and its step are flat. Anything else
takes the per-tensor path, with the same result.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fedtune.core.types import Params, Tiled


def flat_of(params: Params) -> torch.Tensor | None:
    """The 1-D buffer that the tensors of ``params`` tile back to back in dict order, all of one dtype and
    contiguous, or None. ``Tiled`` dicts say so themselves; others take one cheap pass (a few attribute
    reads a tensor, no storage objects made)."""
    if type(params) is Tiled:
        return params.buffer
    tensors = list(params.values())
    if not tensors:
        return None
    first = tensors[0]
    dtype, itemsize = first.dtype, first.element_size()
    start = end = first.data_ptr()
    for t in tensors:
        if t.data_ptr() != end or t.dtype != dtype or not t.is_contiguous():
            return None
        end += t.numel() * itemsize
    storage = first.untyped_storage()
    if end > storage.data_ptr() + storage.nbytes():  # adjacent memory of another allocation
        return None
    return first.as_strided(((end - start) // itemsize,), (1,), first.storage_offset())  # (Σ numel,)


def same_layout(a: Params, b: Params) -> bool:
    """Same names in the same order with the same shapes: two flat buffers then line up value for value."""
    return list(a) == list(b) and all(x.shape == y.shape for x, y in zip(a.values(), b.values(), strict=True))


def flats(dicts: list[Params]) -> list[torch.Tensor] | None:
    """The flat buffers of ``dicts`` if every one tiles its buffer and all share the first's layout."""
    out = [flat_of(d) for d in dicts]
    if any(f is None for f in out) or not all(same_layout(dicts[0], d) for d in dicts[1:]):
        return None
    return out  # type: ignore[return-value]


def unflatten(flat: torch.Tensor, like: Params) -> Params:
    """``flat`` (Σ numel,) as views shaped like ``like``'s tensors, in its order (one C++ call)."""
    return Tiled(zip(like, torch._C._nn.unflatten_dense_tensors(flat, list(like.values())), strict=True), flat)


def packed_like(params: Params, order: Iterable[str]) -> Params:
    """Fresh tensors shaped like ``params``, in ``order`` (all of its names), as views tiling one buffer per
    dtype. Given the order of an update as decoded, the next round's params and update line up."""
    keys = list(order)
    if len(keys) != len(params) or params.keys() != set(keys):
        raise ValueError(f"packing order names {len(keys)} tensors, not the {len(params)} to pack")
    groups: dict[torch.dtype, Params] = {}
    for k in keys:
        groups.setdefault(params[k].dtype, {})[k] = params[k]
    parts = [
        unflatten(torch.empty(sum(t.numel() for t in like.values()), dtype=dtype), like)
        for dtype, like in groups.items()
    ]
    if len(parts) == 1:
        return parts[0]  # Tiled
    merged = {k: t for part in parts for k, t in part.items()}
    return {k: merged[k] for k in keys}
