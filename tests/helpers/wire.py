"""Put plain named tensors into wire form (index names, no codecs) and back, for hand-built messages."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fedtune.core.types import Params
from fedtune.wire.link import Link


def to_wire(params: Params) -> Params:
    return Link().encode(params, {}, torch.Generator())[0]


def from_wire(tensors: Params, names: Iterable[str]) -> Params:
    return Link().decode(tensors, names)
