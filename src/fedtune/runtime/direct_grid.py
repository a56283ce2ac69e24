"""A Grid that sends each message over the direct channel where its client has opened it, else through Flower.

``FlowerRuntime`` talks to this as to Flower's Grid (push messages, pull replies, list nodes), so
pieces, windows, deadlines and every check on a reply are the same on both paths. A message for a
client connected to the hub (``direct_hub``) is queued there; any other goes through the SuperLink
with the hub's port beside it, so the client can open the channel. Replies from the hub come back as
the message-like values the runtime reads (``_Reply``): who sent it is the client whose key signed
it, as Flower's node authentication says for a SuperLink reply.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

from fedtune.runtime import direct_wire as dw
from fedtune.runtime import flower_wire as wire
from fedtune.runtime.direct_hub import Hub

log = logging.getLogger("fedtune")
UNOPENED_WARN = 5  # messages through Flower to a client that never opened the channel before saying so


@dataclass
class _Meta:
    reply_to_message_id: str
    src_node_id: int


@dataclass
class _Reply:
    """A direct reply, read as the runtime reads a Flower reply message."""

    metadata: _Meta
    content: object = None  # a Flower RecordDict (``flower_wire.pack``)
    error: object = None  # a Flower Error

    def has_error(self) -> bool:
        return self.error is not None


class DirectGrid:
    def __init__(self, grid, hub: Hub):
        self.grid, self.hub = grid, hub
        self.names: dict[int, str] = {}  # node id -> enrolled name, as the SuperLink last listed them
        self.nodes: dict[str, int] = {}  # direct message id -> the node it went to
        self.through_flower: Counter[str] = Counter()  # per client never seen on the channel: messages sent by Flower
        self.opened: set[str] = set()  # clients seen on the channel

    def __getattr__(self, attr):  # everything else (its retry invoker, run, ...) is the Grid's
        return getattr(self.grid, attr)

    def get_nodes(self):
        nodes = list(self.grid.get_nodes())
        self.names = {n.node_id: n.name for n in nodes}
        return nodes

    def push_messages(self, messages) -> list[str]:
        """Each message's id ("" for one not delivered): queued at the hub, or pushed through Flower. The Flower
        part goes first, so a push that raises (and is tried again) has queued nothing."""
        ids = [""] * len(messages)
        direct, flower = [], []
        for i, m in enumerate(messages):
            name = self.names.get(m.metadata.dst_node_id)
            if name is not None and self.hub.connected(name):
                direct.append(i)
                self.opened.add(name)
            else:
                flower.append(i)
                self._not_yet_open(name)
        if flower:
            for i in flower:
                messages[i].content[wire.META][dw.PORT] = self.hub.port
            pushed = list(self.grid.push_messages([messages[i] for i in flower]))
            if len(pushed) == len(flower):  # Flower gives [] for a push it could not take
                for i, msg_id in zip(flower, pushed, strict=True):
                    ids[i] = msg_id
        for i in direct:
            node = messages[i].metadata.dst_node_id
            payload, meta = wire.unpack(messages[i].content)
            ids[i] = self.hub.put(self.names[node], meta, payload)
            self.nodes[ids[i]] = node
        return ids

    def _not_yet_open(self, name: str | None) -> None:
        """Say once when a client has not opened the channel after ``UNOPENED_WARN`` messages through Flower."""
        if name is None or name in self.opened:
            return
        self.through_flower[name] += 1
        if self.through_flower[name] == UNOPENED_WARN:
            log.warning(
                "client %s has not opened the direct channel (port %d) after %d messages through the SuperLink: "
                "its exchanges stay slower; check that the port is open to it (runtime.flower.direct_port)",
                name,
                self.hub.port,
                UNOPENED_WARN,
            )

    def pull_messages(self, ids) -> list:
        """The replies available now: the hub's at once, the SuperLink's when any message went that way."""
        from flwr.app import Error

        direct = [i for i in ids if i in self.nodes]
        out: list = []
        for msg_id, _, reply, failed in self.hub.collect(direct):
            meta = _Meta(msg_id, self.nodes.pop(msg_id))
            if failed is not None:
                out.append(_Reply(meta, error=Error(code=0, reason=failed)))
            else:
                assert reply is not None
                out.append(_Reply(meta, content=wire.pack(reply[1], reply[0])))
        rest = [i for i in ids if i not in direct]
        if rest:
            out += list(self.grid.pull_messages(rest))
        return out

    def release(self, ids) -> None:
        """Forget messages whose exchanges are over without their reply (a deadline passed)."""
        gone = [i for i in ids if self.nodes.pop(i, None) is not None]
        self.hub.forget(gone)

    def wait(self, timeout: float) -> None:
        """Return when a direct reply comes, or after ``timeout`` s."""
        self.hub.wait(timeout)
