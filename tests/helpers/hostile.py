"""Hostile replies, generated: mutations of a valid reply as an attacker would make them (bytes, the JSON
header, the codec meta and packed tensors), a runtime that replays prepared replies, and the bound on
the peak memory a category of cases may add. Used by every test that feeds hostile replies through
the real path (``tests/server/test_hostile_replies.py``, secure aggregation, split learning)."""

from __future__ import annotations

import json
import os
import struct
import zlib
from functools import cache
from pathlib import Path
from typing import Any

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from fedtune.core.types import Envelope
from fedtune.wire.link import META
from fedtune.wire.serialize import _HEADER_KEY, read_header

CASES = int(os.environ.get("FEDTUNE_HOSTILE_CASES", 1000))  # per category: 10-15 s each on 2 cores
SETTINGS = settings(
    max_examples=CASES,
    deadline=None,
    derandomize=True,  # the same cases on every run: CI failures reproduce
    database=None,
    suppress_health_check=list(HealthCheck),
)
PEAK_GROWTH_LIMIT = 256 * 2**20  # a category's peak RSS over its start; one declared 2**31-value tensor is 8 GiB


class Replay:
    """A runtime that answers with prepared envelopes, whatever was sent."""

    def __init__(self, envelopes: list[Envelope]):
        self.envelopes = envelopes

    def send_and_receive(self, envelopes, delivery=None):
        return list(self.envelopes)


def peak_growth(run) -> int:
    """Bytes the process's peak RSS rose by while ``run()`` ran (Linux; -1 where it cannot be measured)."""
    status = Path("/proc/self/status")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    except OSError:
        run()
        return -1

    def read(field: str) -> int:
        line = next(x for x in status.read_text().splitlines() if x.startswith(field))
        return int(line.split()[1]) * 1024

    start = read("VmRSS:")
    run()
    return read("VmHWM:") - start


def run_category(body) -> None:
    growth = peak_growth(body)
    assert growth < PEAK_GROWTH_LIMIT, f"peak memory rose by {growth / 2**20:.0f} MiB"


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _split(blob: bytes) -> tuple[dict, bytes]:
    """(safetensors header as a dict, the tensor bytes after it)."""
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _join(header: dict | str, body: bytes) -> bytes:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def with_fedtune_header(blob: bytes, header: dict | str) -> bytes:
    """The blob with its fedtune JSON header replaced (tensors untouched)."""
    st_header, body = _split(blob)
    st_header["__metadata__"][_HEADER_KEY] = header if isinstance(header, str) else json.dumps(header)
    return _join(st_header, body)


@st.composite
def byte_mutations(draw, blob: bytes) -> bytes:
    kind = draw(st.sampled_from(["truncate", "flip", "insert", "append", "header_length"]))
    if kind == "truncate":
        return blob[: draw(st.integers(0, len(blob) - 1))]
    if kind == "flip":
        out = bytearray(blob)
        for _ in range(draw(st.integers(1, 8))):
            out[draw(st.integers(0, len(out) - 1))] ^= draw(st.integers(1, 255))
        return bytes(out)
    if kind == "insert":
        at = draw(st.integers(0, len(blob)))
        return blob[:at] + draw(st.binary(min_size=1, max_size=64)) + blob[at:]
    if kind == "append":
        return blob + draw(st.binary(min_size=1, max_size=4096))
    return struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + blob[8:]  # a lying header length


@st.composite
def header_mutations(draw, blob: bytes) -> bytes:
    header = read_header(blob)
    kind = draw(st.sampled_from(["replace", "add", "remove", "nest", "not_object", "raw"]))
    if kind == "replace":
        field = draw(st.sampled_from(sorted(header)))
        value = draw(
            JSON_VALUES | st.sampled_from([10**30, -1, 0, 2**63, float("inf"), float("nan"), -1e308, "1", [1], True])
        )
        return with_fedtune_header(blob, {**header, field: value})
    if kind == "add":
        return with_fedtune_header(blob, {**header, draw(st.text(min_size=1, max_size=20)): draw(JSON_VALUES)})
    if kind == "remove":
        field = draw(st.sampled_from(sorted(header)))
        return with_fedtune_header(blob, {k: v for k, v in header.items() if k != field})
    if kind == "nest":  # deeper than any JSON parser's recursion limit
        depth = draw(st.integers(1_000, 200_000))
        field = draw(st.sampled_from(sorted(header)))
        raw = json.dumps({k: v for k, v in header.items() if k != field})[:-1]
        return with_fedtune_header(blob, f'{raw}, "{field}": ' + "[" * depth + "]" * depth + "}")
    if kind == "not_object":
        return with_fedtune_header(blob, json.dumps(draw(JSON_VALUES)))
    return with_fedtune_header(blob, draw(st.text(max_size=200)))  # not JSON, or any JSON at all


def decode_parts(blob: bytes) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load

    return load(blob), read_header(blob)


def encode_parts(tensors: dict[str, torch.Tensor], header: dict) -> bytes:
    from fedtune.wire.serialize import encode

    return encode(tensors, header)


@st.composite
def meta_mutations(draw, blob: bytes) -> bytes:
    """Rewrite the codec meta (zlib'd JSON inside the message) or the packed tensors it describes."""
    tensors, header = decode_parts(blob)
    # sorted: safetensors returns tensors in no fixed order, and a split reply can hold two metas
    name = draw(st.sampled_from(sorted(k for k in tensors if k.endswith("/" + META))))
    meta = json.loads(zlib.decompress(tensors[name].numpy().tobytes()))
    kind = draw(st.sampled_from(["shape", "layout", "value", "replace", "bomb", "tensor", "garbage"]))
    if kind in ("shape", "layout", "value"):
        meta = _mutate_json(draw, meta, kind)
        packed = zlib.compress(json.dumps(meta).encode())
    elif kind == "replace":
        packed = zlib.compress(json.dumps(draw(JSON_VALUES)).encode())
    elif kind == "bomb":  # small on the wire, huge inflated
        packed = bomb(draw(st.sampled_from([10**6, 10**7, 10**8])))
    elif kind == "garbage":
        packed = draw(st.binary(max_size=256))
    else:
        packed = zlib.compress(json.dumps(meta).encode())
        target = draw(st.sampled_from(sorted(k for k in tensors if k != name)))
        tensors[target] = mutate_tensor(draw, tensors[target])
    tensors[name] = (
        torch.frombuffer(bytearray(packed), dtype=torch.uint8) if packed else torch.zeros(0, dtype=torch.uint8)
    )
    return encode_parts(tensors, header)


@cache
def bomb(size: int) -> bytes:
    """zlib of a JSON array of ``size`` spaces, compressed in pieces (the test itself stays small)."""
    z = zlib.compressobj(9)
    chunk = b" " * 2**20
    parts = [z.compress(b"[")] + [z.compress(chunk) for _ in range(size // len(chunk))]
    return b"".join([*parts, z.compress(b"]"), z.flush()])


HOSTILE_NUMBERS = st.sampled_from([2**31, 2**31 - 1, 2**40, 2**63 - 1, -1, 0, 1, 10**12, 65_536])


def _mutate_json(draw, meta: Any, kind: str) -> Any:
    """Change one place in the meta: a shape list, a layout entry or any scalar."""
    places: list[tuple[Any, Any]] = []

    def walk(node: Any, in_layout: bool) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, child in items:
            if (
                (kind == "shape" and key == "shape")
                or (kind == "layout" and in_layout)
                or (kind == "value" and not isinstance(child, dict | list))
            ):
                places.append((node, key))
            walk(child, in_layout or key == "layout")

    walk(meta, False)
    if not places:
        return draw(JSON_VALUES)
    node, key = draw(st.sampled_from(places))
    choice = draw(st.sampled_from(["numbers", "json"]))
    if choice == "numbers" and kind in ("shape", "layout"):
        node[key] = draw(st.lists(HOSTILE_NUMBERS, min_size=0, max_size=4))
    elif choice == "numbers":
        node[key] = draw(HOSTILE_NUMBERS)
    else:
        node[key] = draw(JSON_VALUES)
    return meta


def mutate_tensor(draw, t: torch.Tensor) -> torch.Tensor:
    """A packed tensor with some values replaced by hostile ones, its length changed, or its dtype."""
    kind = draw(st.sampled_from(["values", "length", "dtype"]))
    if kind == "length":
        n = draw(st.integers(0, 2 * t.numel() + 8))
        return torch.zeros(n, dtype=t.dtype) if n > t.numel() else t[:n].clone()
    if kind == "dtype":
        return t.to(draw(st.sampled_from([torch.float64, torch.int64, torch.uint8, torch.bfloat16])))
    out = t.clone()
    if out.numel() == 0:
        return out
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, out.numel() - 1))
        if out.is_floating_point():
            out.view(-1)[i] = draw(st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 0.0]))
        else:
            info = torch.iinfo(out.dtype)
            out.view(-1)[i] = draw(st.integers(info.min, info.max))
    return out
