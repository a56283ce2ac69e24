"""Encode and decode the message dataclasses of ``fedtune.types`` as safetensors blobs."""

from __future__ import annotations

import dataclasses

from fedtune.types import EvalReply, EvalRequest, Message, TrainReply, TrainRequest
from fedtune.wire.serialize import decode, encode

_KINDS: dict[str, type] = {cls.KIND: cls for cls in (TrainRequest, TrainReply, EvalRequest, EvalReply)}


def encode_message(msg: Message) -> bytes:
    """Tensor fields go into the safetensors body as '<field>/<name>', every other field into the header."""
    fields = type(msg).TENSORS
    header = {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg) if f.name not in fields}
    header["kind"] = type(msg).KIND
    tensors = {f"{name}/{key}": t for name in fields for key, t in getattr(msg, name).items()}
    return encode(tensors, header)


def decode_message(blob: bytes) -> Message:
    tensors, header = decode(blob)
    kind = header.pop("kind", None)
    if kind not in _KINDS:
        raise ValueError(f"not a fedtune message (kind={kind!r}); expected one of {sorted(_KINDS)}")
    cls = _KINDS[kind]
    groups: dict[str, dict] = {name: {} for name in cls.TENSORS}
    for flat, t in tensors.items():
        name, _, key = flat.partition("/")
        if name not in groups:
            raise ValueError(f"{kind} message carries tensor {flat!r} outside its fields {cls.TENSORS}")
        groups[name][key] = t
    return cls(**header, **groups)
