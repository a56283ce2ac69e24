"""The round loop's runtime in deployment: fedtune envelopes to Flower messages on a Grid, and back.

Clients are known by the names they were enrolled under (their key's file name); the coordinator
maps those names to fedtune client ids in natural order, and to Flower node ids by asking the
SuperLink who is online. A client that is offline, crashes, or misses the round deadline is
logged with the reason on the coordinator and counts as dropped for that round only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from flwr.app import Message
from flwr.serverapp import Grid

from fedtune.errors import RunError, untrusted_text
from fedtune.runtime.flower_wire import MESSAGE_TYPE, pack, unpack
from fedtune.types import ClientState, Envelope

log = logging.getLogger("fedtune")


class FlowerRuntime:
    def __init__(
        self,
        grid: Grid,
        names: Sequence[str],
        round_timeout_s: float | None = None,
        poll_s: float = 0.1,
        insecure: bool = False,
    ):
        self.grid, self.names = grid, list(names)
        self.timeout, self.poll, self.insecure = round_timeout_s, poll_s, insecure
        self.sent = 0
        self.self_named: dict[int, str] = {}  # insecure mode: node id -> the name the client gave

    def online(self) -> dict[str, int]:
        """Enrolled name -> Flower node id, for clients online now."""
        nodes = {n.node_id: n.name for n in self.grid.get_nodes()}
        if self.insecure:  # nobody enrolled: clients name themselves (only their word for it)
            unknown = [i for i in nodes if i not in self.self_named]
            if unknown:
                self.self_named.update(self._ask_names(unknown))
            nodes = {i: self.self_named.get(i, "") for i in nodes}
        return {name: i for i, name in nodes.items() if name in self.names}

    def _ask_names(self, node_ids: list[int]) -> dict[int, str]:
        msgs = [
            Message(content=pack(b"", {"hello": 1}), dst_node_id=i, message_type=MESSAGE_TYPE, group_id="hello")
            for i in node_ids
        ]
        names = {}
        for m, r in self._exchange(msgs, 60.0)[0]:
            try:
                names[m.metadata.dst_node_id] = str(unpack(r.content)[1]["name"])[:200]
            except Exception as exc:  # insecure mode: anyone may answer; a malformed answer names nobody
                log.warning("node %s did not say its name (%s)", m.metadata.dst_node_id, exc)
        return names

    def wait_for_clients(self, wanted: int, needed: int, timeout_s: float) -> dict[str, int]:
        """Wait until ``wanted`` clients are online; after timeout_s, go on with ``needed``, else RunError."""
        deadline, shown = time.monotonic() + timeout_s, -1
        while True:
            online = self.online()
            missing = ", ".join(sorted(set(self.names) - set(online))) or "none"
            if len(online) >= wanted or (time.monotonic() > deadline and len(online) >= needed):
                log.info("%d of %d clients online (missing: %s)", len(online), len(self.names), missing)
                return online
            if time.monotonic() > deadline:
                raise RunError(
                    f"only {len(online)} of {len(self.names)} clients came online within {timeout_s:.0f}s "
                    f"(runtime.flower.join_timeout_s) and federation.min_clients={needed}; missing: {missing}. "
                    "Start them with `fedtune client CONFIG --data PATH --key KEY`"
                )
            if len(online) != shown:
                log.info("waiting for clients: %d of %d online (missing: %s)", len(online), wanted, missing)
                shown = len(online)
            time.sleep(1.0)

    def send_and_receive(self, envelopes: Sequence[Envelope]) -> list[Envelope]:
        online = self.online()
        self.sent += 1
        messages = []
        for e in envelopes:
            name = self.names[e.client_id]
            if name not in online:
                log.warning("client %d (%s) is offline; it misses this exchange", e.client_id, name)
                continue
            content = pack(e.payload, {"client-id": e.client_id})
            # a request that misses the deadline expires with it, so a client that reconnects later
            # is not handed a stale round (Flower keeps undelivered messages for 12 h by default)
            messages.append(
                Message(
                    content=content,
                    dst_node_id=online[name],
                    message_type=MESSAGE_TYPE,
                    group_id=str(self.sent),
                    ttl=self.timeout,
                )
            )
        replies, failed = self._exchange(messages, self.timeout)
        for msg, why in failed:
            cid = int(unpack(msg.content)[1]["client-id"])
            log.warning("client %d (%s): %s", cid, self.names[cid], untrusted_text(why))
        out = []
        for request, reply in replies:  # who replied is the client the request went to, not what the reply says
            cid = int(unpack(request.content)[1]["client-id"])
            try:
                payload, _ = unpack(reply.content)
            except Exception as exc:  # a reply is untrusted: one that is not a fedtune message costs its client
                log.warning("client %d (%s): its reply is not a fedtune message (%s)", cid, self.names[cid], exc)
                continue
            out.append(Envelope(cid, payload))
        return out

    def _exchange(
        self, messages: list[Message], timeout: float | None
    ) -> tuple[list[tuple[Message, Message]], list[tuple[Message, str]]]:
        """([(message, its reply)], [(message, why it got none)]): push, then pull until all answered or timeout.

        A reply counts only if it comes from the node its message went to, and only once.
        """
        if not messages:
            return [], []
        ids = list(self.grid.push_messages(messages))
        sent = {i: m for i, m in zip(ids, messages, strict=True) if i}
        failed = [(m, "could not be delivered") for i, m in zip(ids, messages, strict=True) if not i]
        waiting, replies = set(sent), []
        deadline = None if timeout is None else time.monotonic() + timeout
        while waiting:
            for reply in self.grid.pull_messages(list(waiting)):
                msg_id = reply.metadata.reply_to_message_id
                if msg_id not in waiting or reply.metadata.src_node_id != sent[msg_id].metadata.dst_node_id:
                    log.warning("ignored a reply from node %s to a message it was not sent", reply.metadata.src_node_id)
                    continue
                waiting.discard(msg_id)
                if reply.has_error():
                    failed.append((sent[msg_id], f"failed: {reply.error.reason} (Flower error {reply.error.code})"))
                else:
                    replies.append((sent[msg_id], reply))
            if waiting and deadline is not None and time.monotonic() > deadline:
                failed += [(sent[i], f"missed the {timeout:.0f}s round deadline") for i in sorted(waiting)]
                break
            if waiting:
                time.sleep(self.poll)
        return replies, failed

    def client_states(self) -> dict[int, ClientState]:
        return {}  # deployed clients keep their own state

    def load_client_states(self, states: dict[int, ClientState]) -> None:
        pass

    def close(self) -> None:
        pass
