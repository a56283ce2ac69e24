"""A runtime only moves messages: deliver envelopes to clients, bring back their replies."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from fedtune.types import ClientState, Envelope

# the client side, as a runtime sees it: (client id, request bytes, client state) -> (reply bytes, client state)
Handle = Callable[[int, bytes, ClientState], tuple[bytes, ClientState]]
# several clients at once: [(client id, request bytes, client state)] -> [(reply bytes, client state)], in order
HandleMany = Callable[[list[tuple[int, bytes, ClientState]]], list[tuple[bytes, ClientState]]]


class ClientSide(Protocol):
    """The client side built in this process: one client at a time, or several at once."""

    def handle(self, client_id: int, payload: bytes, state: ClientState) -> tuple[bytes, ClientState]: ...

    def handle_many(self, jobs: list[tuple[int, bytes, ClientState]]) -> list[tuple[bytes, ClientState]]: ...


class Runtime(Protocol):
    def send_and_receive(self, envelopes: Sequence[Envelope]) -> list[Envelope]:
        """Deliver each envelope to its client; return the replies (any order, missing = dropped)."""
        ...

    def client_states(self) -> dict[int, ClientState]:
        """Persistent per-client state held for simulated clients (for checkpoints); {} in deployment."""
        ...

    def load_client_states(self, states: dict[int, ClientState]) -> None: ...

    def close(self) -> None: ...
