"""A runtime only moves messages: deliver envelopes to clients, bring back their replies."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from fedtune.types import Envelope, Params


class Runtime(Protocol):
    def send_and_receive(self, envelopes: Sequence[Envelope]) -> list[Envelope]:
        """Deliver each envelope to its client; return the replies (any order, missing = dropped)."""
        ...

    def client_states(self) -> dict[int, Params]:
        """Persistent per-client state held for simulated clients (for checkpoints); {} in deployment."""
        ...

    def load_client_states(self, states: dict[int, Params]) -> None: ...

    def close(self) -> None: ...
