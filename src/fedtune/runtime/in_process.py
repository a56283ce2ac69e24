"""The embedded default: clients are served in turn, in this process, by one shared handler.

One base model in memory however many clients are simulated; messages still go through the
real encoding, so byte counts are what a deployment would send. The runtime keeps each
simulated client's persistent state (e.g. SCAFFOLD's c_i) between rounds.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedtune.runtime.base import Handle
from fedtune.types import ClientState, Envelope


class InProcessRuntime:
    def __init__(self, handler: Handle):
        self.handler = handler
        self.states: dict[int, ClientState] = {}

    def send_and_receive(self, envelopes: Sequence[Envelope]) -> list[Envelope]:
        replies = []
        for e in envelopes:
            payload, state = self.handler(e.client_id, e.payload, self.states.get(e.client_id, {}))
            if state:
                self.states[e.client_id] = state
            else:  # a client may give up all it kept (split learning's round state at the round's end)
                self.states.pop(e.client_id, None)
            replies.append(Envelope(e.client_id, payload))
        return replies

    def client_states(self) -> dict[int, ClientState]:
        return dict(self.states)

    def load_client_states(self, states: dict[int, ClientState]) -> None:
        self.states = dict(states)

    def close(self) -> None:
        pass
