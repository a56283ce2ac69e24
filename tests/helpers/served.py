"""A runtime that serves every client with the real client handler, in this process, one reply replaced."""

from __future__ import annotations

from collections.abc import Callable

from fedtune.core.types import Envelope


class Served:
    """A runtime serving every client with the real handler, but client 1's reply in exchange ``at`` is
    ``hostile(request payload)`` (None: no reply)."""

    def __init__(self, handler, at: int = -1, hostile: Callable[[bytes], bytes | None] | None = None):
        self.handler, self.at, self.hostile, self.count = handler, at, hostile, 0
        self.states: dict[int, dict] = {}

    def send_and_receive(self, envelopes, delivery=None):
        out = []
        for e in envelopes:
            if e.client_id == 1 and self.count == self.at and self.hostile is not None:
                reply = self.hostile(e.payload)
                if reply is not None:
                    out.append(Envelope(1, reply))
                continue
            payload, self.states[e.client_id] = self.handler.handle(
                e.client_id, e.payload, self.states.get(e.client_id)
            )
            out.append(Envelope(e.client_id, payload))
        self.count += 1
        return out
