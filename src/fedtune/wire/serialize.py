"""Tensors <-> bytes with safetensors: dtypes (bf16 included) survive, nothing is pickled.

A header dict travels in the safetensors metadata as one JSON string, so a message is a
single self-describing blob whose ``len()`` is exactly what crosses the network.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

_HEADER_KEY = "fedtune"


def encode(tensors: dict[str, torch.Tensor], header: dict[str, Any] | None = None) -> bytes:
    """Serialise tensors (made contiguous, moved to CPU) plus a JSON-able header."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return st_save(flat, metadata={_HEADER_KEY: json.dumps(header or {}, sort_keys=True)})


def decode(blob: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Inverse of encode: (tensors, header), the tensors in name order.

    safetensors hands them back in hash-map order, which changes from call to call; anything that
    iterates a decoded message (a float sum, a check that reports the first bad tensor) must not.
    """
    return dict(sorted(st_load(blob).items())), read_header(blob)


def read_header(blob: bytes) -> dict[str, Any]:
    """The JSON header alone, without touching the tensor bytes."""
    (n,) = struct.unpack("<Q", blob[:8])
    meta = json.loads(blob[8 : 8 + n]).get("__metadata__") or {}
    return json.loads(meta.get(_HEADER_KEY, "{}"))
