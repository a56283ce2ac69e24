"""A runtime only moves messages: deliver envelopes to clients, bring back their replies."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from fedtune.core.types import ClientState, Envelope

# the client side, as a runtime sees it: (client id, request bytes, client state) -> (reply bytes, client state)
Handle = Callable[[int, bytes, ClientState], tuple[bytes, ClientState]]
# several clients at once: [(client id, request bytes, client state)] -> [(reply bytes, client state)], in order
HandleMany = Callable[[list[tuple[int, bytes, ClientState]]], list[tuple[bytes, ClientState]]]


@dataclass(frozen=True)
class Delivery:
    """What a runtime is told about one exchange besides its envelopes.

    ``max_reply_bytes``: a reply larger than this is dropped before it is held whole, where the runtime can;
    ``round_started``: ``time.monotonic()`` when the round's conversation began, so that one deadline covers
    all of a client's round (a runtime with a round deadline counts from there); ``release``: the envelopes
    are a list handed over, which the runtime may empty to let each request go once it is delivered.
    """

    max_reply_bytes: int | None = None
    round_started: float | None = None
    release: bool = False


PLAIN = Delivery()  # no cap, no round start, nothing handed over


class ClientSide(Protocol):
    """The client side built in this process: one client at a time, or several at once."""

    def handle(self, client_id: int, payload: bytes, state: ClientState) -> tuple[bytes, ClientState]: ...

    def handle_many(self, jobs: list[tuple[int, bytes, ClientState]]) -> list[tuple[bytes, ClientState]]: ...


class Runtime(Protocol):
    def send_and_receive(self, envelopes: Sequence[Envelope], delivery: Delivery = PLAIN) -> list[Envelope]:
        """Deliver each envelope to its client; return the replies (any order, missing = dropped)."""
        ...

    def client_states(self) -> dict[int, ClientState]:
        """Persistent per-client state held for simulated clients (for checkpoints); {} in deployment."""
        ...

    def load_client_states(self, states: dict[int, ClientState]) -> None: ...

    def close(self) -> None: ...


class SimulatedClients:
    """What a simulation runtime keeps for its clients between exchanges: each one's persistent state, in this
    process whichever worker or lane served it (checkpoints read it; a resume loads it back)."""

    def __init__(self) -> None:
        self.states: dict[int, ClientState] = {}

    def state_of(self, client_id: int) -> ClientState:
        return self.states.get(client_id, {})

    def keep(self, client_id: int, state: ClientState) -> None:
        """The state a client's reply came with; a client may give up all it kept (split learning's round
        state at the round's end): an empty state is forgotten."""
        if state:
            self.states[client_id] = state
        else:
            self.states.pop(client_id, None)

    def client_states(self) -> dict[int, ClientState]:
        return dict(self.states)

    def load_client_states(self, states: dict[int, ClientState]) -> None:
        self.states = dict(states)


class Affinity:
    """Which worker (lane, Ray actor) served each client last, so that its next job goes there when it is free.

    Replies never depend on the worker; what a worker's process holds for the clients it served does (an
    offsite-tuning emulator is sent to a client and kept by the process that received it): keeping a
    client on its worker keeps a round's exchanges with it in one process."""

    def __init__(self) -> None:
        self.last: dict[int, Any] = {}

    def pick(self, client_id: int, idle: list, pending: Iterable[int]) -> Any:
        """Take the worker for ``client_id`` out of ``idle`` (non-empty): its last one if free, else one that no
        ``pending`` client was last served by, else any."""
        want = self.last.get(client_id)
        for i, w in enumerate(idle):
            if w is want:
                return idle.pop(i)
        others = {id(self.last[c]) for c in pending if c in self.last}
        for i, w in enumerate(idle):
            if id(w) not in others:
                return idle.pop(i)
        return idle.pop()

    def served(self, client_id: int, worker: Any) -> None:
        self.last[client_id] = worker
