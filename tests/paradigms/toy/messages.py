"""The toy paradigm's two messages: a request to report, and the reported number."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class Report:
    """Server -> client: report your number for this round."""

    KIND: ClassVar[str] = "toy_report"
    TENSORS: ClassVar[tuple[str, ...]] = ()
    round: int
    scale: float


@dataclass(frozen=True)
class Number:
    """Client -> server: the number."""

    KIND: ClassVar[str] = "toy_number"
    TENSORS: ClassVar[tuple[str, ...]] = ()
    round: int
    value: float
    steps: int = 0  # what a deployed client logs of a training reply (wire.protocol)
