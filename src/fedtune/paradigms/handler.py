"""Client side, as a runtime sees it: (client id, bytes, client state) -> (bytes, client state).

Knows nothing of runtimes and nothing of what a paradigm does: it decodes a request of one of the
kinds the paradigm's client half serves, lets it serve, and encodes the reply. In simulation one
handler serves many virtual clients over one shared model and the runtime keeps each client's
state; in deployment a client keeps its own.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedtune.client.data import ClientData
from fedtune.core.types import ClientState
from fedtune.paradigms.base import ClientParadigm
from fedtune.wire.messages import decode_message, encode_message


class ClientHandler:
    def __init__(self, paradigm: ClientParadigm, data: dict[int, ClientData]):
        """``data``: client id -> local data of every client this handler may serve (shared with ``paradigm``)."""
        self.paradigm, self.data = paradigm, data

    def reads_only(self, kind: str) -> bool:
        """Whether serving a request of ``kind`` leaves client state as it is (its class declares ``READS_ONLY``,
        wire/protocol.py: an evaluation): it is served from the state after its round's training."""
        return any(kind == cls.KIND and getattr(cls, "READS_ONLY", False) for cls in self.paradigm.serves)

    def handle(self, client_id: int, payload: bytes, state: ClientState | None = None) -> tuple[bytes, ClientState]:
        """Serve one request; ``state`` is this client's persistent state, returned updated."""
        if client_id not in self.data:
            raise KeyError(f"this handler has no data for client {client_id}")
        request = decode_message(payload, *self.paradigm.serves)
        reply, state = self.paradigm.serve(client_id, request, state or {})
        return encode_message(reply), state

    def handle_many(self, jobs: Sequence[tuple[int, bytes, ClientState | None]]) -> list[tuple[bytes, ClientState]]:
        """Serve several clients' requests, in one go where the paradigm can (``serve_many``), else in turn;
        the replies in the order of ``jobs``."""
        many = getattr(self.paradigm, "serve_many", None)
        if many is None or len(jobs) < 2:
            return [self.handle(*job) for job in jobs]
        for client_id, _, _ in jobs:
            if client_id not in self.data:
                raise KeyError(f"this handler has no data for client {client_id}")
        requests = [(cid, decode_message(payload, *self.paradigm.serves), state or {}) for cid, payload, state in jobs]
        return [(encode_message(reply), state) for reply, state in many(requests)]
