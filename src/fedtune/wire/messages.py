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
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import torch

from fedtune.wire.protocol import KIND, check_message_class
from fedtune.wire.serialize import decode, encode

SEP = "/"  # '<field>/<name>' for dict-of-tensor fields; a bare '<field>' for a tensor field


class Message(Protocol):
    KIND: ClassVar[str]
    TENSORS: ClassVar[tuple[str, ...]]


def encode_message(msg: Any) -> bytes:
    """Tensor fields go into the safetensors body, every other field into the header (with ``kind``: the
    header fields every message carries are ``wire.protocol``'s, checked here once per message class)."""
    check_message_class(type(msg))
    fields = type(msg).TENSORS
    header = {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg) if f.name not in fields}
    header[KIND] = type(msg).KIND
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
    kind = header.pop(KIND, None)
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
    spec = _header_spec(cls)
    unknown = sorted(set(header) - spec.keys())
    if unknown:
        raise ValueError(f"{cls.KIND} message has unknown header fields {unknown[:3]}")
    for name, (required, fits) in spec.items():
        if name not in header:
            if required:
                raise ValueError(f"{cls.KIND} message lacks header field {name!r}")
            continue
        if not fits(header[name]):
            hint = _hints(cls)[name]
            raise ValueError(f"{cls.KIND} message field {name!r}: {type(header[name]).__name__} is not {hint}")


@functools.cache
def _header_spec(cls: type) -> dict[str, tuple[bool, Callable[[Any], bool]]]:
    """Header field -> (required, its type check), worked out once a message class."""
    hints = _hints(cls)
    return {
        f.name: (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING, _checker(hints[f.name]))
        for f in dataclasses.fields(cls)
        if f.name not in cls.TENSORS
    }


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _checker(hint: Any) -> Callable[[Any], bool]:
    """Whether a JSON value has the declared type (ints are accepted as floats, bools never as numbers).
    JSON gives exact built-in types, so ``type(v) is`` is the test; the hint is taken apart once."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [_checker(h) for h in typing.get_args(hint)]
        return lambda v: any(fits(v) for fits in options)
    if origin is typing.Literal:
        allowed = {(type(a), a) for a in typing.get_args(hint)}
        return lambda v: (type(v), v) in allowed if isinstance(v, (str, int, float, bool, type(None))) else False
    if origin is dict:
        key_fits, value_fits = (_checker(h) for h in typing.get_args(hint))
        return lambda v: type(v) is dict and all(key_fits(k) and value_fits(x) for k, x in v.items())
    if hint is type(None):
        return lambda v: v is None
    if hint is float:
        return lambda v: type(v) is float or type(v) is int
    if hint in (bool, int, str):
        return lambda v: type(v) is hint
    return lambda v: True  # tensor fields and anything richer are checked by the reader
