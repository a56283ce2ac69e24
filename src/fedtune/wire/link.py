"""One direction of the wire: a codec chain, applied to tensors named by position, packed by dtype.

An adapter is hundreds of small tensors (SmolLM2 LoRA r=8: 240 of 4,608 values), and a codec
chain makes two or three parts of each; per-tensor safetensors entries and 60-character names
would then be a large share of a compressed payload. So:

- both ends already know the adapter's tensor names (the server from the view it sent, a client
  from its own adapter): a tensor is named by its index in the sorted names, behind its layer
  number so that codecs that work by layer still see layers ("3.17": layer 3, tensor 17);
- the encoded parts are concatenated into one flat tensor per dtype, and a compact layout
  (part name, shape) tells the receiver how to split them again;
- the codec meta and the layout travel as one zlib-compressed JSON tensor ``meta`` (uint8), so
  every byte of the update, description included, is in the safetensors body and counted.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable, Mapping

import torch

from fedtune.codecs import Chain, Packed, build_chain
from fedtune.codecs.block_dropout import layer_component
from fedtune.core.types import Params, Tiled

META = "meta"  # dtype names key the packed tensors, so this cannot collide
# an honest meta holds a layout line per part and a few numbers per tensor: ~20-170 bytes a tensor
# for the chains tried (plain, top-k + int4, random-k + int8, low-rank); 2 KiB a tensor is ample
META_BYTES_BASE, META_BYTES_PER_TENSOR = 65_536, 2_048
# the most bytes one value takes on the wire through any chain: an 8-byte value with an int64 index
# (top-k at full density); a message's headers (names, shapes, JSON fields, the meta) take at most
# WIRE_BYTES_BASE plus WIRE_BYTES_PER_TENSOR per tensor on top
WIRE_BYTES_PER_VALUE, WIRE_BYTES_BASE, WIRE_BYTES_PER_TENSOR = 16, 131_072, 4_096


class Link:
    """Encode a named update for the wire and decode it back, through one codec chain."""

    def __init__(self, chain: Chain | None = None):
        self.chain = chain or Chain([])

    @classmethod
    def from_specs(cls, specs: Iterable[dict], error_feedback: bool = False) -> Link:
        return cls(build_chain(list(specs), error_feedback))

    def describe(self) -> str:
        return self.chain.describe()

    def encode(self, params: Params, state: Params, gen: torch.Generator) -> tuple[Params, Params]:
        """-> (wire tensors, new state); error-feedback residuals live in ``state``."""
        short = short_names(params)
        packed, state = self.chain.encode({short[n]: t for n, t in params.items()}, state, gen)
        tensors, layout = pack_by_dtype(packed.tensors)
        meta = json.dumps({**packed.meta, "layout": layout}, separators=(",", ":"), sort_keys=True)
        tensors[META] = torch.frombuffer(bytearray(zlib.compress(meta.encode(), 9)), dtype=torch.uint8)
        return tensors, state

    def decode(self, tensors: Params, names: Iterable[str], max_numel: int | None = None) -> Params:
        """The update under its real names; ``names`` are the keys the receiver expects. Given as the
        receiver's own tensors (a dict), they also bound what the meta may declare (``max_numel``:
        the most values of one tensor; else no bound beyond the meta's size cap)."""
        if max_numel is None and isinstance(names, Mapping) and names:
            max_numel = max(t.numel() for t in names.values())
        short = short_names(names)
        if not tensors:  # an empty message part (e.g. a diverged client's delta)
            return {}
        tensors = dict(tensors)
        if META not in tensors:
            raise ValueError(f"no {META!r} tensor: not an update encoded by fedtune.wire.link")
        cap = META_BYTES_BASE + META_BYTES_PER_TENSOR * len(short)
        try:
            meta = json.loads(inflate(tensors.pop(META).numpy().tobytes(), cap))
        except (zlib.error, ValueError, RecursionError) as exc:
            raise ValueError(f"unreadable codec meta: {exc}") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("layout"), dict):
            raise ValueError("unreadable codec meta: not an object with a layout")
        layout = meta.pop("layout")
        unpacked = unpack_by_dtype(tensors, layout)
        decoded = self.chain.decode(Packed(unpacked, meta), max_numel)
        expected = set(short.values())
        if decoded.keys() != expected:
            raise ValueError(
                f"decoded {len(decoded)} tensors, expected the {len(short)} this receiver holds "
                f"(unexpected: {sorted(decoded.keys() - expected)[:3]}, "
                f"missing: {sorted(expected - decoded.keys())[:3]})"
            )
        name = {s: n for n, s in short.items()}
        out = {name[s]: t for s, t in decoded.items()}  # in the packed order: the views tile one buffer
        if not self.chain.stages and len(tensors) == 1 and len(out) == sum(len(e) for e in layout.values()):
            (flat,) = tensors.values()  # split in layout order, every part kept (no name twice): tiled
            if flat.dim() == 1:
                return Tiled(out, flat)
        return out


def max_wire_bytes(numel: int, tensors: int) -> int:
    """The largest message an honest sender can make to carry ``tensors`` tensors of ``numel`` values in
    all (with any codec chain, plus headers): a receiver refuses a bigger reply before parsing it."""
    return WIRE_BYTES_BASE + WIRE_BYTES_PER_TENSOR * tensors + WIRE_BYTES_PER_VALUE * numel


def inflate(data: bytes, cap: int) -> bytes:
    """zlib-decompress ``data``, refusing (ValueError) to produce more than ``cap`` bytes: a few KB
    of crafted input can otherwise inflate to gigabytes before anything is checked."""
    d = zlib.decompressobj()
    out = d.decompress(data, cap)
    if d.unconsumed_tail or not d.eof:
        raise ValueError(f"compressed meta inflates past its {cap:,}-byte limit, or is truncated")
    return out


def apply_change(held: Params, change: Params) -> Params:
    """held + change, key by key: the one formula a downlink update is applied with on both ends
    (server replica and client), so they agree to the bit."""
    return {k: held[k] + change[k] for k in held}


def short_names(names: Iterable[str]) -> dict[str, str]:
    """name -> "<layer>.<index>" (index among the sorted names; layer = the first integer path
    component, ``codecs.block_dropout.layer_component``, as block dropout groups them), or "<index>" without one."""
    out = {}
    for i, name in enumerate(sorted(names)):
        at = layer_component(name)
        out[name] = f"{name.split('.')[at]}.{i}" if at is not None else str(i)
    return out


def pack_by_dtype(tensors: Params) -> tuple[Params, dict[str, list]]:
    """One flat tensor per dtype (parts in sorted name order) and the layout to split it:
    {dtype: [[name, shape], ...]}, shape an int for 1-D parts."""
    groups: dict[str, list[str]] = {}
    for name in sorted(tensors):
        groups.setdefault(str(tensors[name].dtype).removeprefix("torch."), []).append(name)
    flat: Params = {}
    layout: dict[str, list] = {}
    for dtype, names in groups.items():
        flat[dtype] = torch.cat([tensors[n].reshape(-1) for n in names])  # (sum of numels,)
        layout[dtype] = [[n, tensors[n].numel() if tensors[n].ndim == 1 else list(tensors[n].shape)] for n in names]
    return flat, layout


def unpack_by_dtype(flat: Params, layout: dict[str, list]) -> Params:
    """Inverse of pack_by_dtype; a flat tensor that does not match its layout is an error."""
    if flat.keys() != layout.keys():
        raise ValueError(f"packed dtypes {sorted(flat)} do not match the layout's {sorted(layout)}")
    out: Params = {}
    for dtype, entries in layout.items():
        shapes = [torch.Size([s]) if isinstance(s, int) else torch.Size(s) for _, s in entries]
        sizes = [s.numel() for s in shapes]
        if sum(sizes) != flat[dtype].numel():
            raise ValueError(f"packed {dtype} tensor has {flat[dtype].numel()} values, its layout {sum(sizes)}")
        for (name, _), shape, part in zip(entries, shapes, torch.split(flat[dtype], sizes), strict=True):
            out[name] = part.reshape(shape)
    return out
