"""A fedtune message inside a Flower message: one raw uint8 Array plus a small config record.

Every fedtune message (a safetensors blob, bf16 intact, byte counts exact) travels as one raw
uint8 ``Array`` (Flower splits Arrays into chunks, so payloads over 1 GB pass) with the target
client's fedtune id beside it. Imported by the Grid runtime and by the ClientApp, which Flower
starts afresh for every message: it imports nothing but Flower's record types.
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

PAYLOAD, META = "fedtune", "fedtune-meta"  # record names in a Flower message
MESSAGE_TYPE = "query"  # fedtune messages say what they are; Flower's type is only routing


def pack(payload: bytes, meta: dict[str, int | str]) -> RecordDict:
    array = Array(dtype="uint8", shape=(len(payload),), stype="raw", data=payload)
    return RecordDict({PAYLOAD: ArrayRecord({"payload": array}), META: ConfigRecord(dict(meta))})


def unpack(content: RecordDict) -> tuple[bytes, dict]:
    return content[PAYLOAD]["payload"].data, dict(content[META])
