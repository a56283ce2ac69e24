"""The header fields a runtime or a deployed client reads without knowing a message's paradigm.

Every message (``wire.messages``) carries in its JSON header, besides its own fields:

  ``kind``       its class's ``KIND`` (what a reader checks it against)
  ``round``      the round it belongs to: an ``int`` field every message class declares

A request may declare

  ``continues``  ``bool``: True when it goes on from the state its round left (the later exchanges of a
                 client's round: split learning's micro-batches, secure aggregation's steps); absent or
                 False, it starts from the client's state before its round, so a round the coordinator
                 repeats after a crash replays exactly what it did the first time

A request class may declare ``READS_ONLY: ClassVar[bool] = True`` (not a header field): serving it changes no
client state (an evaluation), so a deployed client serves it from the state its round's training left and
saves nothing.

A reply to training may declare, for a deployed client's log, ``steps`` (int), ``train_loss``
(float) and ``local_train_s`` (float). ``check_message_class`` holds every message class to this when
it is first encoded; ``RequestFacts`` and ``ReplyFacts`` read them back from a header.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass
from typing import Any

KIND, ROUND, CONTINUES = "kind", "round", "continues"
REPORTED = {"steps": int, "train_loss": float, "local_train_s": float}  # a training reply's log fields


@functools.cache
def check_message_class(cls: type) -> None:
    """TypeError unless ``cls`` follows the protocol: a dataclass with ``KIND`` and ``TENSORS``, an ``int``
    ``round`` field, no ``kind`` field, and ``continues`` / the reported fields (where declared) of their types."""
    if (
        not dataclasses.is_dataclass(cls)
        or not isinstance(getattr(cls, "KIND", None), str)
        or not isinstance(getattr(cls, "TENSORS", None), tuple)
    ):
        raise TypeError(f"{cls.__name__}: a message is a dataclass with a KIND and TENSORS (wire/protocol.py)")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    if hints.get(ROUND) is not int:
        raise TypeError(f"{cls.__name__}: every message declares 'round: int' (wire/protocol.py)")
    if KIND in fields:
        raise TypeError(f"{cls.__name__}: 'kind' is the protocol's own header field; name the field otherwise")
    if CONTINUES in fields and hints[CONTINUES] is not bool:
        raise TypeError(f"{cls.__name__}: 'continues' must be a bool (wire/protocol.py)")
    for name, kind in REPORTED.items():
        if name in fields and not _admits(hints[name], kind):
            raise TypeError(f"{cls.__name__}: '{name}' must be {kind.__name__} (wire/protocol.py)")


def _admits(hint: Any, kind: type) -> bool:
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return kind in options


def _number(value: Any, kind: type) -> Any:
    """``value`` as ``kind`` (an int, or a float where an int also reads as one), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if kind is int:
        return value if isinstance(value, int) else None
    return float(value)


@dataclass(frozen=True)
class RequestFacts:
    """What a deployed client needs to know of a request before its paradigm reads it."""

    kind: str
    round: int
    continues: bool

    @classmethod
    def of(cls, header: dict[str, Any]) -> RequestFacts:
        kind, r, continues = header.get(KIND), header.get(ROUND), header.get(CONTINUES, False)
        if type(kind) is not str or type(r) is not int or r < 0 or type(continues) is not bool:
            raise ValueError(f"not a fedtune request header (kind {kind!r:.40}, round {r!r:.20})")
        return cls(kind, r, continues)


@dataclass(frozen=True)
class ReplyFacts:
    """What a deployed client logs of its own reply: what it trained, where the reply says."""

    kind: str
    steps: int | None
    train_loss: float | None
    local_train_s: float | None

    @classmethod
    def of(cls, header: dict[str, Any]) -> ReplyFacts:
        return cls(str(header.get(KIND)), **{name: _number(header.get(name), kind) for name, kind in REPORTED.items()})
