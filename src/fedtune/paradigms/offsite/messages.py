"""Offsite-tuning's own messages: the emulator down (once per client process), whether it is held up.

A round starts by asking each sampled client whether its process holds the emulator of this digest
(``EmulatorRequest`` without tensors); those that do not are sent it whole (the emulator's tensors by
the emulator model's own names, and the initial adapter on it), or, when they hold an earlier emulator
of the run (FedBiOT's re-alignment changes only the middle), the middle blocks alone. Training then
goes on as parameter sharing's round, on the adapter's tensors as the emulator names them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from fedtune.core.types import Params


@dataclass(frozen=True)
class EmulatorRequest:
    """Server -> client: hold the emulator ``digest`` names; ``weights`` empty asks whether it is held."""

    KIND: ClassVar[str] = "offsite_emulator"
    TENSORS: ClassVar[tuple[str, ...]] = ("weights", "initial")
    round: int
    digest: str  # sha256 of the emulator's tensors (``emulator.digest``)
    weights: Params = field(default_factory=dict)  # the emulator's parameters by its own names; {}: a question
    initial: Params = field(default_factory=dict)  # the initial adapter on the emulator (what clients start from)
    base: str = ""  # weights are only what differs from emulator ``base``, which the client said it holds


@dataclass(frozen=True)
class EmulatorReply:
    """Client -> server: ``held`` when this process holds emulator ``digest`` (now), ``missing`` when not."""

    KIND: ClassVar[str] = "offsite_emulator_reply"
    TENSORS: ClassVar[tuple[str, ...]] = ()
    round: int
    digest: str
    status: Literal["held", "missing"] = "held"
    holds: str = ""  # missing: the emulator it holds instead ("" none), for a partial update
