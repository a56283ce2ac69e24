"""A runtime only moves messages: deliver envelopes to clients, bring back their replies."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from fedtune.types import Envelope


class Runtime(Protocol):
    def send_and_receive(self, envelopes: Sequence[Envelope]) -> list[Envelope]:
        """Deliver each envelope to its client; return the replies (any order, missing = dropped)."""
        ...

    def close(self) -> None: ...
