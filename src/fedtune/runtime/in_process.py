"""The embedded default: clients are served in turn, in this process, by one shared handler.

One base model in memory however many clients are simulated; messages still go through the
real encoding, so byte counts are what a deployment would send.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from fedtune.types import Envelope

Handler = Callable[[int, bytes], bytes]


class InProcessRuntime:
    def __init__(self, handler: Handler):
        self.handler = handler

    def send_and_receive(self, envelopes: Sequence[Envelope]) -> list[Envelope]:
        return [Envelope(e.client_id, self.handler(e.client_id, e.payload)) for e in envelopes]

    def close(self) -> None:
        pass
