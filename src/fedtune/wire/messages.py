"""Encode and decode the message dataclasses of ``fedtune.types`` as safetensors blobs."""

from __future__ import annotations

import dataclasses

from fedtune.types import EvalReply, EvalRequest, Message, TrainReply, TrainRequest
from fedtune.wire.serialize import decode, encode

_KINDS: dict[str, type] = {cls.KIND: cls for cls in (TrainRequest, TrainReply, EvalRequest, EvalReply)}


def encode_message(msg: Message) -> bytes:
    """Tensors go into the safetensors body, every other field into the JSON header."""
    tensor_field = type(msg).TENSORS
    header = {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg) if f.name != tensor_field}
    header["kind"] = type(msg).KIND
    return encode(getattr(msg, tensor_field) if tensor_field else {}, header)


def decode_message(blob: bytes) -> Message:
    tensors, header = decode(blob)
    kind = header.pop("kind", None)
    if kind not in _KINDS:
        raise ValueError(f"not a fedtune message (kind={kind!r}); expected one of {sorted(_KINDS)}")
    cls = _KINDS[kind]
    if cls.TENSORS:
        header[cls.TENSORS] = tensors
    return cls(**header)
