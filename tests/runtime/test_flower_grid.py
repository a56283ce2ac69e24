"""FlowerRuntime on a Grid in memory: retries of transient errors, and large payloads in bounded pieces.

The client side is fedtune's real node-side answer (``deploy.node.answer``) over the worker's real
piece exchanges, so the piece protocol runs end to end except for Flower's own transport; dishonest
clients are made by rewriting the honest replies.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable
from types import SimpleNamespace

import pytest

pytest.importorskip("flwr")

import httpx
from flwr.app import Message
from flwr.supercore.inflatable.inflatable_utils import ObjectPushError

from fedtune.core.types import Envelope
from fedtune.deploy.local_worker import PieceExchanges
from fedtune.deploy.node import answer, failure
from fedtune.runtime import flower_grid
from fedtune.runtime import flower_wire as wire
from fedtune.runtime.base import Delivery
from fedtune.runtime.flower_grid import FlowerRuntime, is_transient, widen_flower_retries
from fedtune.runtime.flower_wire import pack, unpack

NAMES = ["client-0", "client-1", "client-2"]
NODES = {101: "client-0", 102: "client-1", 103: "client-2"}


def http_error(code: int) -> httpx.HTTPStatusError:
    request = httpx.Request("POST", "https://superlink/api")
    return httpx.HTTPStatusError(f"{code}", request=request, response=httpx.Response(code, request=request))


def transform(cid: int, payload: bytes) -> bytes:
    """The toy client: a reply that differs from the request and is twice as long."""
    return payload[::-1] + payload + bytes([cid])


class FakeGrid:
    """A SuperLink in memory. A pushed message is answered at once by ``respond`` (None: never);
    answers wait to be pulled, newest first. ``fail[call]`` lists errors its next calls raise."""

    def __init__(self, respond: Callable[[Message], Message | list[Message] | None]):
        self.respond = respond
        self.ready: dict[str, list[Message]] = {}
        self.fail: dict[str, list[BaseException]] = {"get_nodes": [], "push": [], "pull": []}
        self.calls: Counter = Counter()
        self.pushed: list[Message] = []
        self.answers: list[Message] = []
        self.in_flight: Counter = Counter()  # node id -> messages pushed and not yet answered by a pull
        self.most_in_flight: Counter = Counter()

    def _call(self, name: str) -> None:
        self.calls[name] += 1
        if self.fail[name]:
            raise self.fail[name].pop(0)

    def get_nodes(self):
        self._call("get_nodes")
        return [SimpleNamespace(node_id=i, name=n) for i, n in NODES.items()]

    def push_messages(self, messages):
        self._call("push")
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id
            ids.append(m.metadata.message_id)
            self.pushed.append(m)
            node = m.metadata.dst_node_id
            self.in_flight[node] += 1
            self.most_in_flight[node] = max(self.most_in_flight[node], self.in_flight[node])
            out = self.respond(m)
            for r in out if isinstance(out, list) else [] if out is None else [out]:
                self.answers.append(r)
                self.ready.setdefault(m.metadata.message_id, []).append(r)
        return ids

    def pull_messages(self, message_ids):
        self._call("pull")
        out = []
        for i in message_ids:
            for r in self.ready.pop(i, []):
                self.in_flight[r.metadata.src_node_id] -= 1
                out.append(r)
        return out[::-1]  # replies come in any order


class _Worker:
    """The part of a LocalWorker the node loop calls: whole requests, and pieced exchanges over them."""

    def __init__(self, handle):
        self.serve_one, self.pieces = handle, PieceExchanges(handle)


@pytest.fixture
def client_app(flower_task):
    """respond(msg): fedtune's node-side answer (deploy/node.py) over a worker serving ``transform``."""
    handled: list[tuple[int, int]] = []

    def handle(cid: int, run: str, payload: bytes) -> bytes:
        handled.append((cid, len(payload)))
        if payload.startswith(b"bad"):
            raise ValueError("cannot read this request")
        return transform(cid, payload)

    worker = _Worker(handle)

    def respond(msg: Message) -> Message:
        try:
            return answer(msg, worker, NODES[msg.metadata.dst_node_id])
        except Exception as exc:  # what the node loop sends back for a message it cannot serve
            return failure(msg, exc)

    respond.handled = handled  # type: ignore[attr-defined]
    return respond


def runtime(grid, piece_bytes=1000, timeout=30.0, **kw) -> FlowerRuntime:
    return FlowerRuntime(grid, NAMES, timeout, poll_s=0.001, piece_bytes=piece_bytes, backoff_s=0.001, **kw)


def payloads(sizes: list[int]) -> list[Envelope]:
    return [Envelope(c, os.urandom(n)) for c, n in enumerate(sizes)]


def replies_by_client(out: list[Envelope]) -> dict[int, bytes]:
    return {e.client_id: e.payload for e in out}


def test_small_payloads_travel_as_one_message_each_with_the_reply_whole(client_app):
    grid = FakeGrid(client_app)
    sent = payloads([10, 0, 999])
    out = runtime(grid).send_and_receive(sent)
    assert replies_by_client(out) == {e.client_id: transform(e.client_id, e.payload) for e in sent}
    assert len(grid.pushed) == 3 + 1  # client 2's reply (1999 bytes) comes in 2 pieces: one fetch
    first = unpack(grid.pushed[0].content)
    assert first[0] == sent[0].payload and set(first[1]) == {wire.CLIENT, wire.EXCHANGE, wire.PIECE_SIZE, wire.RUN}
    assert unpack(grid.answers[0].content)[1] == {wire.CLIENT: 0}  # a small reply: as before pieces


def test_large_payloads_go_both_ways_in_bounded_pieces(client_app):
    grid = FakeGrid(client_app)
    sent = payloads([10_500, 3_001, 1_000])
    out = runtime(grid, window=2).send_and_receive(sent)
    assert replies_by_client(out) == {e.client_id: transform(e.client_id, e.payload) for e in sent}
    assert all(len(unpack(m.content)[0]) <= 1000 for m in grid.pushed)  # every message at most one piece
    assert max(len(unpack(r.content)[0]) for r in grid.answers) == 1000
    assert sorted(client_app.handled) == [(0, 10_500), (1, 3_001), (2, 1_000)]  # each request run once
    assert max(grid.most_in_flight.values()) == 2  # the window


def test_a_piece_size_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(wire.PIECE_MB_ENV, "0.5")
    assert wire.default_piece_bytes() == 2**19
    monkeypatch.delenv(wire.PIECE_MB_ENV)
    assert wire.default_piece_bytes() == wire.PIECE_BYTES == 128 * 2**20


def test_transient_errors_are_retried_until_each_call_succeeds(client_app, caplog):
    grid = FakeGrid(client_app)
    grid.fail["get_nodes"] = [http_error(500), httpx.ConnectError("connection refused")]
    grid.fail["push"] = [http_error(503), ObjectPushError("obj", 7, "session"), httpx.ReadTimeout("slow")]
    grid.fail["pull"] = [http_error(500), http_error(429), httpx.RemoteProtocolError("cut"), http_error(504)]
    sent = payloads([2_500, 10, 10])
    with caplog.at_level(logging.WARNING, "fedtune"):
        out = runtime(grid).send_and_receive(sent)
    assert replies_by_client(out) == {e.client_id: transform(e.client_id, e.payload) for e in sent}
    assert grid.calls["get_nodes"] == 3 and not any(grid.fail.values())
    assert "push_messages failed (HTTP 503)" in caplog.text and "pull_messages failed (HTTP 500)" in caplog.text


def test_a_grid_that_never_recovers_costs_the_clients_their_reply_not_the_run(client_app, caplog):
    grid = FakeGrid(client_app)
    rt = runtime(grid, timeout=1.0)
    grid.fail["pull"] = [http_error(500)] * 100_000
    with caplog.at_level(logging.WARNING, "fedtune"):
        assert rt.send_and_receive(payloads([10, 5_000, 10])) == []
    assert caplog.text.count("its reply could not be pulled (HTTP 500)") == 3
    grid.fail["pull"] = []
    grid.fail["push"] = [httpx.ConnectError("refused")] * 100_000
    assert rt.send_and_receive(payloads([10, 10, 10])) == []
    assert "could not be delivered (ConnectError: refused)" in caplog.text
    grid.fail["push"] = []
    grid.fail["get_nodes"] = [http_error(502)] * 100_000
    assert rt.send_and_receive(payloads([10, 10, 10])) == []
    assert "could not ask the SuperLink who is online (HTTP 502)" in caplog.text


def test_a_deadline_bounds_the_retries(client_app):
    import time

    grid = FakeGrid(client_app)
    grid.fail["pull"] = [http_error(500)] * 100_000
    rt = FlowerRuntime(grid, NAMES, 0.5, poll_s=0.001, piece_bytes=1000, backoff_s=0.05, max_backoff_s=0.2)
    t = time.monotonic()
    assert rt.send_and_receive(payloads([10, 10, 10])) == []
    assert time.monotonic() - t < 1.5


def test_errors_that_are_not_transient_are_not_retried(client_app, caplog):
    grid = FakeGrid(client_app)
    grid.fail["push"] = [http_error(400)]
    with caplog.at_level(logging.WARNING, "fedtune"):
        assert runtime(grid).send_and_receive(payloads([10, 10, 10])) == []
    assert grid.calls["push"] == 1 and caplog.text.count("could not be delivered (HTTP 400)") == 3
    grid.fail["pull"] = [RuntimeError("a bug, not the network")]
    with pytest.raises(RuntimeError, match="a bug"):
        runtime(grid).send_and_receive(payloads([10, 10, 10]))
    assert not is_transient(http_error(404)) and not is_transient(httpx.ConnectError("[SSL] certificate verify"))
    assert is_transient(http_error(408)) and is_transient(http_error(500)) and is_transient(httpx.ConnectTimeout(""))


def _dishonest(respond, cid: int, rewrite: Callable[[Message, Message], Message | list[Message] | None]):
    """Client ``cid`` answers with rewrite(message, honest answer); the others answer honestly."""

    def reply(msg: Message):
        honest = respond(msg)
        return rewrite(msg, honest) if unpack(msg.content)[1].get(wire.CLIENT) == cid else honest

    return reply


def _with(msg: Message, data: bytes | None = None, **meta) -> Message:
    """An answer to ``msg`` like ``honest``'s but with other bytes or meta."""
    return Message(pack(data, {k.replace("_", "-"): v for k, v in meta.items()}), reply_to=msg)


def _rewritten(rewrite_meta: Callable[[bytes, dict], tuple[bytes, dict]]):
    def rewrite(msg: Message, honest: Message) -> Message:
        data, meta = unpack(honest.content)
        data, meta = rewrite_meta(data, meta)
        return Message(pack(data, meta), reply_to=msg)

    return rewrite


@pytest.mark.parametrize(
    ("rewrite_meta", "why"),
    [
        (lambda d, m: (d, {**m, wire.REPLY_SHA256: "0" * 64} if wire.REPLY_SHA256 in m else m), "sha256"),
        (lambda d, m: (d, {**m, wire.REPLY_TOTAL: 10**12} if wire.REPLY_TOTAL in m else m), "declared size"),
        (lambda d, m: (d, {**m, wire.REPLY_TOTAL: -1} if wire.REPLY_TOTAL in m else m), "declared size"),
        (lambda d, m: (d, {**m, wire.PIECE: 7} if wire.PIECE in m else m), "got '7'"),
        (lambda d, m: (d[:-1] if wire.PIECE in m else d, m), "holds 999 bytes, not 1,000"),
        (lambda d, m: (d, {**m, wire.REPLY_SHA256: "xyz"} if wire.REPLY_SHA256 in m else m), "not a sha256"),
    ],
    ids=["wrong-sha256", "oversized-total", "negative-total", "wrong-index", "short-piece", "bad-sha256"],
)
def test_a_reply_that_breaks_the_piece_protocol_costs_only_its_client(client_app, caplog, rewrite_meta, why):
    grid = FakeGrid(_dishonest(client_app, 1, _rewritten(rewrite_meta)))
    sent = payloads([2_500, 2_500, 10])
    with caplog.at_level(logging.WARNING, "fedtune"):
        out = runtime(grid).send_and_receive(sent)
    assert replies_by_client(out) == {c: transform(c, sent[c].payload) for c in (0, 2)}
    assert "client 1 (client-1)" in caplog.text and why in caplog.text


@pytest.mark.parametrize("form", ["not-bytes", "inline-and-array"])
def test_a_reply_whose_inline_payload_is_malformed_costs_only_its_client(client_app, caplog, form):
    """The payload beside the meta (``flower_wire.INLINE_BYTES``) must be bytes, and not beside an array too."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    def rewrite(msg: Message, honest: Message) -> Message:
        data, meta = unpack(honest.content)
        if form == "not-bytes":
            return Message(RecordDict({wire.META: ConfigRecord({**meta, wire.PAYLOAD: 12345})}), reply_to=msg)
        array = Array(dtype="uint8", shape=(len(data),), stype="raw", data=data)
        content = {wire.PAYLOAD: ArrayRecord({"payload": array}), wire.META: ConfigRecord({**meta, wire.PAYLOAD: data})}
        return Message(RecordDict(content), reply_to=msg)

    grid = FakeGrid(_dishonest(client_app, 1, rewrite))
    sent = payloads([10, 10, 10])
    with caplog.at_level(logging.WARNING, "fedtune"):
        out = runtime(grid).send_and_receive(sent)
    assert replies_by_client(out) == {c: transform(c, sent[c].payload) for c in (0, 2)}
    assert "client 1 (client-1): its reply is not a fedtune message" in caplog.text


def test_a_missing_piece_costs_its_client_at_the_deadline(client_app, caplog):
    def drop_fetch_2(msg, honest):
        return None if unpack(msg.content)[1].get(wire.FETCH) == 2 else honest

    grid = FakeGrid(_dishonest(client_app, 0, drop_fetch_2))
    sent = payloads([2_500, 10, 10])
    with caplog.at_level(logging.WARNING, "fedtune"):
        out = runtime(grid, timeout=0.6).send_and_receive(sent)
    assert replies_by_client(out) == {c: transform(c, sent[c].payload) for c in (1, 2)}
    assert "client 0 (client-0): missed the 1s round deadline" in caplog.text


def test_duplicate_answers_and_out_of_order_pieces_are_taken_once(client_app, caplog):
    def twice(msg, honest):
        return [honest, honest]  # a reply delivered twice: the second is not the answer to anything

    grid = FakeGrid(_dishonest(client_app, 2, twice))
    sent = payloads([4_200, 4_200, 4_200])
    with caplog.at_level(logging.WARNING, "fedtune"):
        out = runtime(grid, window=3).send_and_receive(sent)
    assert replies_by_client(out) == {e.client_id: transform(e.client_id, e.payload) for e in sent}
    assert "ignored a reply from node 103 to a message it was not sent" in caplog.text


def test_a_client_that_takes_every_piece_without_replying_is_dropped(client_app, caplog):
    def always_have(msg, honest):
        return _with(msg, b"", client_id=0, have=1) if wire.FETCH not in unpack(msg.content)[1] else honest

    grid = FakeGrid(_dishonest(client_app, 0, always_have))
    with caplog.at_level(logging.WARNING, "fedtune"):
        out = runtime(grid).send_and_receive(payloads([2_500, 10, 10]))
    assert sorted(replies_by_client(out)) == [1, 2]
    assert "took every request piece but did not reply" in caplog.text


def test_a_client_error_is_its_reason_to_be_dropped(client_app, caplog):
    grid = FakeGrid(client_app)
    sent = [Envelope(0, b"bad" + os.urandom(2_500)), *payloads([10, 10, 2_500])[1:]]
    with caplog.at_level(logging.WARNING, "fedtune"):
        out = runtime(grid).send_and_receive(sent)
    assert replies_by_client(out) == {c: transform(c, sent[c].payload) for c in (1, 2)}
    assert "client 0 (client-0): failed: fedtune client: ValueError: cannot read this request" in caplog.text


def test_flower_per_request_retries_are_widened_to_500_within_a_budget():
    from flwr.superlink.grid.http_grid import HttpGrid

    grid = HttpGrid("127.0.0.1:1", insecure=True, token="t")
    invoker = grid._retry_invoker
    assert invoker.should_giveup(http_error(500)) is True  # Flower's own rule
    assert widen_flower_retries(grid, budget_s=5.0) and widen_flower_retries(grid, budget_s=5.0)
    assert invoker.should_giveup(http_error(500)) is False and invoker.max_time == 5.0
    assert invoker.should_giveup(http_error(404)) is True  # the rest is Flower's rule still
    invoker.wait_function = lambda s: None
    failures = [http_error(500), http_error(500)]

    def request():
        if failures:
            raise failures.pop(0)
        return "ok"

    assert invoker.invoke(request) == "ok"
    flower_grid._unwidened_logged = False
    assert widen_flower_retries(SimpleNamespace()) is False


def test_waiting_for_clients_and_asking_their_names_survive_a_flaky_superlink(client_app):
    grid = FakeGrid(client_app)
    grid.fail["get_nodes"] = [http_error(500)] * 3
    grid.fail["push"] = [httpx.ConnectError("refused")]
    rt = FlowerRuntime(grid, NAMES, 30.0, poll_s=0.001, insecure=True, backoff_s=0.001)
    assert rt.wait_for_clients(3, 3, 10) == {n: i for i, n in NODES.items()}  # names as the clients gave them
    hello = unpack(grid.pushed[0].content)
    assert hello == (b"", {"hello": 1}) and grid.pushed[0].metadata.group_id == "hello"


@pytest.mark.parametrize(
    ("size", "cap"), [(5_000, None), (900, 100), (2_500, 1_000)], ids=["over-piece", "whole", "pieced"]
)
def test_a_reply_over_the_cap_is_refused_whole_or_pieced(client_app, caplog, size, cap):
    """A whole reply larger than one piece (a client should have sent it in pieces) or than what the exchange
    can need (``max_reply_bytes``) costs its client; so does a pieced one that declares more."""

    def big(msg, honest):
        meta = unpack(honest.content)[1]
        if size <= 1_000 or wire.REPLY_TOTAL in meta or cap is None:  # a whole reply, of any size
            return _with(msg, os.urandom(size), client_id=1)
        return honest

    grid = FakeGrid(_dishonest(client_app, 1, big))
    sent = payloads([10, 1_200 if size == 2_500 else 10, 10])
    with caplog.at_level(logging.WARNING, "fedtune"):
        out = runtime(grid).send_and_receive(sent, Delivery(max_reply_bytes=cap))
    assert sorted(replies_by_client(out)) == [0, 2]  # the honest replies are 21 bytes
    assert "client 1 (client-1)" in caplog.text


def test_one_deadline_covers_a_clients_whole_round(client_app, caplog):
    """The round deadline counts from the round's start, not from each exchange: a conversation of many
    exchanges cannot stretch it."""
    import time

    grid = FakeGrid(_dishonest(client_app, 0, lambda msg, honest: None))  # client 0 never answers
    started = time.monotonic() - 29.5  # the round began 29.5 s ago, its deadline is 30 s
    with caplog.at_level(logging.WARNING, "fedtune"):
        began = time.monotonic()
        out = runtime(grid, timeout=30.0).send_and_receive(payloads([10, 10, 10]), Delivery(round_started=started))
    assert time.monotonic() - began < 5 and sorted(replies_by_client(out)) == [1, 2]
    assert "client 0 (client-0): missed the 30s round deadline" in caplog.text


def test_a_request_handed_over_is_let_go_once_delivered(client_app, monkeypatch):
    """With ``release``, the runtime keeps no copy of a request once the SuperLink has all its pieces: by the
    time the reply is put together, only the reply is held (what keeps a 3 GB exchange's peak memory down)."""
    made: list = []
    real = flower_grid._Exchange

    def recorded(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(flower_grid, "_Exchange", recorded)
    held: list[bool] = []

    def respond(msg):
        if wire.FETCH in unpack(msg.content)[1]:  # the reply is being fetched: the request was delivered
            held.append(made[-1].payload is not None)
        return client_app(msg)

    sent = payloads([5_000])
    expected = transform(0, sent[0].payload)
    out = runtime(FakeGrid(respond)).send_and_receive(sent, Delivery(release=True))
    assert sent == [] and replies_by_client(out) == {0: expected}  # the caller's list was handed over
    assert held and not any(held)
