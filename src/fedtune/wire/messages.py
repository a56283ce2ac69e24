"""Encode and decode message dataclasses as safetensors blobs; a reader names the kinds it accepts.

A message is a frozen dataclass with ``KIND`` (its name on the wire) and ``TENSORS`` (its tensor
fields: a tensor, or a dict of named tensors). Every other field travels in the JSON header, and a
decoded header must fit the dataclass: no unknown or missing fields, and each value of the type the
field declares (int, float, str, bool, None, dict[str, float]). Each paradigm declares its own
messages; nothing here knows them, so a receiver can only get the kinds it asked for.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, ClassVar, Protocol

import torch

from fedtune.wire.serialize import decode, encode

SEP = "/"  # '<field>/<name>' for dict-of-tensor fields; a bare '<field>' for a tensor field


class Message(Protocol):
    KIND: ClassVar[str]
    TENSORS: ClassVar[tuple[str, ...]]


def encode_message(msg: Any) -> bytes:
    """Tensor fields go into the safetensors body, every other field into the header."""
    fields = type(msg).TENSORS
    header = {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg) if f.name not in fields}
    header["kind"] = type(msg).KIND
    tensors: dict[str, torch.Tensor] = {}
    for name in fields:
        value = getattr(msg, name)
        if isinstance(value, torch.Tensor):
            tensors[name] = value
        else:
            tensors.update({f"{name}{SEP}{key}": t for key, t in value.items()})
    return encode(tensors, header)


def decode_message(blob: bytes, *kinds: type) -> Any:
    """The message in ``blob``, which must be one of ``kinds``; ValueError (or a decoding error) otherwise."""
    tensors, header = decode(blob)
    if not isinstance(header, dict):
        raise ValueError(f"message header is a {type(header).__name__}, not an object")
    kind = header.pop("kind", None)
    by_kind = {k.KIND: k for k in kinds}
    if not isinstance(kind, str) or kind not in by_kind:
        raise ValueError(f"not an expected fedtune message (kind={kind!r:.40}); expected one of {sorted(by_kind)}")
    cls = by_kind[kind]
    hints = _hints(cls)
    values: dict[str, Any] = {n: {} for n in cls.TENSORS if typing.get_origin(hints[n]) is dict}  # may be empty
    for flat, t in tensors.items():
        name, sep, key = flat.partition(SEP)
        if name not in cls.TENSORS:
            raise ValueError(f"{kind} message carries tensor {flat!r:.60} outside its fields {cls.TENSORS}")
        is_dict = typing.get_origin(hints[name]) is dict
        if bool(sep) != is_dict or (not is_dict and name in values):
            raise ValueError(f"{kind} message tensor {flat!r:.60} does not fit its field {name!r}")
        if is_dict:
            values[name][key] = t
        else:
            values[name] = t
    _check_header(cls, header)
    return cls(**header, **values)


def _check_header(cls: type, header: dict[str, Any]) -> None:
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in cls.TENSORS}
    unknown = sorted(set(header) - set(fields))
    if unknown:
        raise ValueError(f"{cls.KIND} message has unknown header fields {unknown[:3]}")
    for name, field in fields.items():
        if name not in header:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise ValueError(f"{cls.KIND} message lacks header field {name!r}")
            continue
        if not _fits(header[name], hints[name]):
            raise ValueError(f"{cls.KIND} message field {name!r}: {type(header[name]).__name__} is not {hints[name]}")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value has the declared type (ints are accepted as floats, bools never as numbers)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin is dict:
        key_t, value_t = typing.get_args(hint)
        return isinstance(value, dict) and all(_fits(k, key_t) and _fits(v, value_t) for k, v in value.items())
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True  # tensor fields and anything richer are checked by the reader
