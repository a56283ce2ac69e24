"""A fedtune message inside Flower messages: bytes in a small config record, or a raw uint8 Array beside it.

Every fedtune message (a safetensors blob, bf16 intact, byte counts exact) travels with the target
client's fedtune id beside it: inline in the config record up to ``INLINE_BYTES`` (three Flower
objects to move), else as one raw uint8 ``Array``, when it fits in one piece (``PIECE_BYTES``). A
larger one travels as several Flower messages of at most one piece each: the SuperLink holds a
message whole until it is received (and a SQLite-backed one deletes it in one transaction, about
5 s per GB, blocking every other writer), so no message may be large. The pieces of one exchange:

* coordinator -> client: piece i of the request (``PIECE``, with ``TOTAL`` and ``SHA256`` of the
  whole); the client answers ``HAVE`` until it holds them all, then runs the request and answers
  with the reply: whole, or its first piece with ``REPLY_TOTAL`` and ``REPLY_SHA256``;
* coordinator -> client: ``FETCH`` i for each further reply piece; the client answers piece i.

Both ends put a message together with ``Assembly``, which takes no size on trust. Imported by the
Grid runtime, by the ClientApp (which Flower starts afresh for every message) and by the client's
worker: it imports Flower only to pack and unpack, and nothing heavy.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import secrets
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flwr.app import RecordDict

PAYLOAD, META = "fedtune", "fedtune-meta"  # record names in a Flower message
MESSAGE_TYPE = "query"  # fedtune messages say what they are; Flower's type is only routing

PIECE_BYTES = 128 * 2**20  # the largest Flower message fedtune sends: ~0.6 s of SQLite delete on the SuperLink
MAX_PIECE_BYTES = 2**30  # a piece size a receiver accepts (it holds ~3 pieces while receiving one)
PIECE_MB_ENV = "FEDTUNE_FLOWER_PIECE_MB"  # overrides PIECE_BYTES on the coordinator (MiB, may be fractional)

# meta keys (the ConfigRecord beside the payload)
CLIENT = "client-id"  # the fedtune client id a request is for (a reply's is not trusted)
EXCHANGE = "exchange"  # the coordinator's id for one request/reply exchange with one client
PIECE_SIZE = "piece-bytes"  # the exchange's piece size, both ways
PIECE = "piece"  # index of the piece a message carries
TOTAL, SHA256 = "total", "sha256"  # size and hex sha256 of the whole request
HAVE = "have"  # a client's answer to a request piece while it still waits for others
REPLY_TOTAL, REPLY_SHA256 = "reply-bytes", "reply-sha256"  # a reply that comes in pieces
FETCH = "fetch"  # the coordinator asks for reply piece i
RUN = "run"  # the coordinator's run: a client keeps its state per run (the same across a resumed run)


INLINE_BYTES = 4 * 2**20  # a payload up to this rides inside the meta record: 3 Flower objects to move, not 6


def pack(payload: bytes, meta: dict[str, int | str]) -> RecordDict:
    """A Flower message's content: the payload inline beside the meta when small (each Flower object is a
    request to the SuperLink both ways), else as a raw array (which Flower moves in 5 MiB chunks)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    if len(payload) <= INLINE_BYTES:
        return RecordDict({META: ConfigRecord({**meta, PAYLOAD: bytes(payload)})})
    array = Array(dtype="uint8", shape=(len(payload),), stype="raw", data=payload)
    return RecordDict({PAYLOAD: ArrayRecord({"payload": array}), META: ConfigRecord(dict(meta))})


def unpack(content: RecordDict) -> tuple[bytes, dict]:
    """(payload, meta) of a message ``pack`` made; ValueError for content of another shape."""
    meta = dict(content[META])
    inline = meta.pop(PAYLOAD, None)
    if inline is not None:
        if not isinstance(inline, bytes) or PAYLOAD in content:
            raise ValueError("a fedtune message's payload is bytes, inline or as an array, not both")
        return inline, meta
    return content[PAYLOAD]["payload"].data, meta


def default_piece_bytes() -> int:
    """``PIECE_BYTES``, or ``$FEDTUNE_FLOWER_PIECE_MB`` MiB where set."""
    mb = os.environ.get(PIECE_MB_ENV)
    return checked_piece_bytes(int(float(mb) * 2**20) if mb else PIECE_BYTES)


def checked_piece_bytes(size: object) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_PIECE_BYTES:
        raise ValueError(f"a piece size must be 1..{MAX_PIECE_BYTES} bytes, not {size!r}")
    return size


def piece_count(total: int, piece_bytes: int) -> int:
    """Pieces of ``total`` bytes (an empty message is one empty piece)."""
    return max(1, -(-total // piece_bytes))


def piece_span(index: int, total: int, piece_bytes: int) -> tuple[int, int]:
    """[start, end) of piece ``index``: every piece is ``piece_bytes`` long but the last."""
    return index * piece_bytes, min(total, (index + 1) * piece_bytes)


def checked_int(value: object, low: int, high: int, what: str) -> int:
    """``value`` if it is an int in [low, high], else ValueError: every number in a message is untrusted."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{what} must be an integer in {low}..{high:,}, not {str(value)[:40]!r}")
    return value


def checked_run(value: object) -> str:
    """A run id as the coordinator makes them (``new_run_id``: 32 hex digits), else ValueError."""
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{32}", value):
        raise ValueError(f"not a fedtune run id: {str(value)[:40]!r}")
    return value


def new_run_id() -> str:
    return secrets.token_hex(16)


def checked_sha256(value: object) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ValueError(f"not a sha256 hex digest: {str(value)[:80]!r}")
    return value


class Assembly:
    """One message put together from its pieces, in any order, each piece once.

    Every size is the sender's word: ``total`` is checked against ``limit`` before anything is
    allocated, each piece must have exactly its span's length (a repeated index is ignored), and
    the whole must hash to ``sha256`` (None: a single piece that Flower's content hashes vouch for).
    """

    def __init__(self, total: object, piece_bytes: int, sha256: object, limit: int):
        self.total = checked_int(total, 0, limit, "the declared size")
        self.piece_bytes = checked_piece_bytes(piece_bytes)
        self.sha256 = None if sha256 is None else checked_sha256(sha256)
        self.count = piece_count(self.total, piece_bytes)
        self.have: set[int] = set()
        self._buffer: bytes | bytearray | None = _blank(self.total)  # pages are touched only as pieces arrive

    @property
    def complete(self) -> bool:
        return len(self.have) == self.count

    def add(self, index: object, data: bytes) -> bool:
        """Store piece ``index`` (ValueError if out of range or of the wrong length); False if a repeat."""
        index = checked_int(index, 0, self.count - 1, "a piece index")
        start, end = piece_span(index, self.total, self.piece_bytes)
        if len(data) != end - start:
            raise ValueError(f"piece {index} holds {len(data):,} bytes, not {end - start:,}")
        if index in self.have:
            return False
        if self._buffer is None:
            raise ValueError("this message was already taken")
        _write(self._buffer, start, data)
        self.have.add(index)
        return True

    def result(self) -> bytes:
        """The whole message, once every piece is here and it hashes right (else ValueError); once only."""
        if not self.complete or self._buffer is None:
            raise ValueError(f"{self.count - len(self.have)} of {self.count} pieces missing")
        data = self._buffer if isinstance(self._buffer, bytes) else bytes(self._buffer)
        self._buffer = None
        if self.sha256 is not None and hashlib.sha256(data).hexdigest() != self.sha256:
            raise ValueError("the pieces put together do not match the declared sha256")
        return data


# A message is handed on as ``bytes`` (safetensors reads nothing else). Filling a bytearray and
# copying it would hold the message twice, so on CPython the pieces are written straight into a
# fresh, not yet shared bytes object, as CPython's own b"".join does: nothing sees it (or hashes
# it) before every byte is written and the whole is checked. Elsewhere: a bytearray, copied once.
_BYTES_DATA = bytes.__basicsize__ - 1  # offset of a bytes object's data (PyBytesObject.ob_sval)
_IN_PLACE = platform.python_implementation() == "CPython"
if _IN_PLACE:
    _new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
    _new_bytes.restype, _new_bytes.argtypes = ctypes.py_object, (ctypes.c_void_p, ctypes.c_ssize_t)


def _blank(size: int) -> bytes | bytearray:
    if _IN_PLACE and size > 1:  # 0- and 1-byte bytes objects are shared singletons
        return _new_bytes(None, size)
    return bytearray(size)


def _write(buffer: bytes | bytearray, offset: int, data: bytes) -> None:
    if isinstance(buffer, bytearray):
        buffer[offset : offset + len(data)] = data
    elif data:
        ctypes.memmove(id(buffer) + _BYTES_DATA + offset, bytes(data), len(data))
