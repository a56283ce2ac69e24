"""The embedded default: one base model in memory, clients served in lanes that share it.

With one lane, clients are served in turn in this process by one shared handler. With more, each
lane is a forked child of this process (``runtime.lanes``): all lanes read the one copy of the
base weights, and each trains its own client at the same time on one torch thread. Messages
still go through the real encoding, so byte counts are what a deployment would send. The runtime
keeps each simulated client's persistent state (e.g. SCAFFOLD's c_i) between rounds, in this
process, whichever lane served the client.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedtune.core.types import ClientState, Envelope
from fedtune.runtime.base import PLAIN, Delivery, Handle, HandleMany, SimulatedClients
from fedtune.runtime.lanes import LanePool


class InProcessRuntime(SimulatedClients):
    def __init__(
        self,
        handler: Handle,
        lanes: int = 1,
        torch_threads: int | None = None,
        timeout_s: float | None = None,
        many: HandleMany | None = None,
        group: int = 1,
    ):
        """``lanes`` > 1: that many forked lanes, one torch thread each; ``torch_threads``: for one lane,
        the torch threads clients train with (default: leave torch's setting); ``timeout_s``: a lane
        that has not replied by then is stopped and its client dropped for the exchange; ``many`` with
        ``group`` > 1 (one lane): the clients of an exchange are handed over ``group`` at a time, in order."""
        if lanes > 1 and torch_threads not in (None, 1):
            raise ValueError(f"{lanes} lanes run one torch thread each, not {torch_threads}")
        if group > 1 and (many is None or lanes > 1):
            raise ValueError(f"handing clients over {group} at a time needs a handler of many and one lane")
        super().__init__()
        self.handler, self.threads, self.many, self.group = handler, torch_threads, many, group
        self.pool = LanePool(handler, lanes, timeout_s) if lanes > 1 else None

    def send_and_receive(self, envelopes: Sequence[Envelope], delivery: Delivery = PLAIN) -> list[Envelope]:
        jobs = [(e.client_id, e.payload, self.state_of(e.client_id)) for e in envelopes]
        done = self.pool.run(jobs) if self.pool is not None else self._serve_in_turn(jobs)
        replies = []
        for e in envelopes:
            if e.client_id not in done:
                continue  # its lane died or missed the deadline (logged by the pool)
            payload, state = done[e.client_id]
            self.keep(e.client_id, state)
            replies.append(Envelope(e.client_id, payload))
        return replies

    def _serve_in_turn(self, jobs: list) -> dict[int, tuple[bytes, ClientState]]:
        if self.threads is None:  # torch's setting untouched: even re-setting it changes kernels' float order
            return self._serve(jobs)
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return self._serve(jobs)
        finally:
            torch.set_num_threads(before)

    def _serve(self, jobs: list) -> dict[int, tuple[bytes, ClientState]]:
        if self.many is None or self.group < 2:
            return {cid: self.handler(cid, payload, state) for cid, payload, state in jobs}
        done = {}
        for i in range(0, len(jobs), self.group):
            chunk = jobs[i : i + self.group]
            done.update(zip((cid for cid, _, _ in chunk), self.many(chunk), strict=True))
        return done

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
