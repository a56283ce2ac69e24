"""The direct channel's frames and request signatures, shared by the coordinator and its clients.

In a round, a deployed coordinator and an enrolled client talk over one TLS connection the client
opens to the coordinator (``direct_hub``), not through the SuperLink. A frame is one fedtune
message: the same meta (``flower_wire``'s keys) and payload a Flower message would carry,
as ``MAGIC``, the meta's JSON length (4 bytes, big-endian), the meta as a JSON object of short
string keys to ints or strings, and the payload. Every request a client makes is signed with its
enrolment key (ECDSA over SHA-256) over the method, path, a timestamp, a nonce and the body's
SHA-256, so the coordinator knows which enrolled client sent it, that nothing was changed, and that
it is not a replay (``Replays``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import secrets
import struct
import time
from collections import OrderedDict

MAGIC = b"FTD1"
META_MAX = 64 * 2**10  # the largest meta a frame may declare
KEY_MAX, STR_MAX = 64, 4096  # a meta key's and a string value's longest
SKEW_S = 120.0  # how far a request's timestamp may be from the coordinator's clock
# headers of a signed request
KEY, TIME, NONCE, SIGNATURE = "x-fedtune-key", "x-fedtune-time", "x-fedtune-nonce", "x-fedtune-signature"
# meta keys the channel adds to a message
ID = "direct-id"  # the coordinator's id of a message it sends
REPLY_TO = "direct-reply-to"  # the id a client's reply answers
ERROR = "direct-error"  # a client's reason for not answering
PORT = "direct-port"  # beside a message sent through Flower: where the coordinator's channel listens


def encode(meta: dict[str, int | str], payload: bytes = b"") -> bytes:
    return head(meta) + bytes(payload)


def head(meta: dict[str, int | str]) -> bytes:
    """A frame up to its payload (a sender may write the payload after it without joining the two)."""
    raw = json.dumps(meta, separators=(",", ":")).encode()
    return MAGIC + struct.pack(">I", len(raw)) + raw


def decode(frame: bytes) -> tuple[dict[str, int | str], bytes]:
    """(meta, payload) of a frame; ValueError naming what is wrong with one that is not well formed."""
    head = len(MAGIC) + 4
    if len(frame) < head or frame[: len(MAGIC)] != MAGIC:
        raise ValueError("not a fedtune direct frame")
    (n,) = struct.unpack(">I", frame[len(MAGIC) : head])
    if n > META_MAX or head + n > len(frame):
        raise ValueError(f"a frame declares {n:,} bytes of meta ({len(frame) - head:,} follow; at most {META_MAX:,})")
    try:
        meta = json.loads(frame[head : head + n])
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"a frame's meta is not JSON ({type(exc).__name__})") from None
    return checked_meta(meta), frame[head + n :]


def checked_meta(meta: object) -> dict[str, int | str]:
    """``meta`` if it is a flat object of short string keys to ints (64-bit) or short strings, else ValueError."""
    if not isinstance(meta, dict):
        raise ValueError("a frame's meta is not an object")
    for k, v in meta.items():
        if len(k) > KEY_MAX:
            raise ValueError(f"a meta key of {len(k)} characters (at most {KEY_MAX})")
        ok = (isinstance(v, int) and not isinstance(v, bool) and -(2**63) <= v < 2**63) or (
            isinstance(v, str) and len(v) <= STR_MAX
        )
        if not ok:
            raise ValueError(f"meta {k[:KEY_MAX]!r} is not an integer or a string of at most {STR_MAX} characters")
    return meta


def signed_text(method: str, path: str, stamp: str, nonce: str, body: bytes) -> bytes:
    """What a request's signature covers."""
    return "\n".join(("fedtune-direct-1", method, path, stamp, nonce, hashlib.sha256(body).hexdigest())).encode()


def sign(private_key, public_der: bytes, method: str, path: str, body: bytes) -> dict[str, str]:
    """The headers that sign one request with an enrolment key (``public_der``: its public key, DER)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    stamp, nonce = f"{time.time():.3f}", secrets.token_hex(16)
    signature = private_key.sign(signed_text(method, path, stamp, nonce, body), ec.ECDSA(hashes.SHA256()))
    b64 = base64.b64encode
    return {KEY: b64(public_der).decode(), TIME: stamp, NONCE: nonce, SIGNATURE: b64(signature).decode()}


def public_der(public_key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


class Unauthorized(ValueError):
    """A request whose signature does not hold, from a key not enrolled, stale, or replayed."""


class Replays:
    """Nonces seen within the clock window, so a captured request cannot be sent again (bounded: the oldest go)."""

    def __init__(self, limit: int = 100_000):
        self.seen: OrderedDict[str, float] = OrderedDict()
        self.limit = limit

    def fresh(self, nonce: str, now: float) -> bool:
        while self.seen and (len(self.seen) >= self.limit or next(iter(self.seen.values())) < now - 2 * SKEW_S):
            self.seen.popitem(last=False)
        if nonce in self.seen:
            return False
        self.seen[nonce] = now
        return True


Keys = dict[bytes, tuple[str, object]]  # enrolled public key (DER) -> (name, public key)


def verify(headers, method: str, path: str, body: bytes, keys: Keys, replays: Replays) -> str:
    """The enrolled name whose key signed this request (``keys``: public DER -> (name, public key)), else
    Unauthorized saying why."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    name, key, stamp, nonce = checked_headers(headers, keys)
    try:
        signature = base64.b64decode(headers.get(SIGNATURE, ""), validate=True)
        key.verify(signature, signed_text(method, path, stamp, nonce, body), ec.ECDSA(hashes.SHA256()))
    except (ValueError, InvalidSignature):
        raise Unauthorized("the request's signature does not hold") from None
    if not replays.fresh(nonce, time.time()):
        raise Unauthorized("a request sent before (replayed nonce)")
    return name


def checked_headers(headers, keys: Keys) -> tuple[str, object, str, str]:
    """(name, public key, timestamp, nonce) of a request's headers, before its body is read: Unauthorized for a
    key not enrolled, a timestamp out of the window, or a malformed nonce."""
    try:
        der = base64.b64decode(headers.get(KEY, "")[:2048], validate=True)
    except ValueError:
        raise Unauthorized("no readable key") from None
    found = keys.get(der)
    if found is None:
        raise Unauthorized("a key that is not enrolled")
    stamp, nonce = headers.get(TIME, ""), headers.get(NONCE, "")
    try:
        when = float(stamp[:32])
    except ValueError:
        raise Unauthorized("no readable timestamp") from None
    if not math.isfinite(when) or abs(when - time.time()) > SKEW_S:
        raise Unauthorized(f"a timestamp more than {SKEW_S:.0f} s from the coordinator's clock")
    if len(nonce) != 32 or any(c not in "0123456789abcdef" for c in nonce):
        raise Unauthorized("no readable nonce")
    return found[0], found[1], stamp, nonce
