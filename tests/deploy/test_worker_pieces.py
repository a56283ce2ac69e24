"""The client worker's side of pieced exchanges: requests put together from pieces, replies handed out in pieces."""

from __future__ import annotations

import hashlib
import os
import random

import pytest

from fedtune.deploy.local_worker import PieceExchanges
from fedtune.runtime import flower_wire as wire

P = 100  # piece size
RUN = "ab" * 16


def _pieces(eid: str, payload: bytes, size: int = P) -> list[tuple[dict, bytes]]:
    sha = hashlib.sha256(payload).hexdigest()
    info = {wire.EXCHANGE: eid, wire.PIECE_SIZE: size, wire.TOTAL: len(payload), wire.SHA256: sha, wire.RUN: RUN}
    return [
        ({**info, wire.PIECE: i}, payload[slice(*wire.piece_span(i, len(payload), size))])
        for i in range(wire.piece_count(len(payload), size))
    ]


@pytest.fixture
def flower_task():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None


class Handler:
    def __init__(self, grow: int = 3):
        self.calls: list[tuple[int, bytes]] = []
        self.grow = grow

    def __call__(self, cid: int, run: str, request: bytes) -> bytes:
        assert type(request) is bytes  # what safetensors reads
        self.calls.append((cid, request))
        return request[::-1] * self.grow


def _fetch_all(ex: PieceExchanges, cid: int, eid: str, first: tuple[dict, bytes]) -> bytes:
    said, data = first
    total = said[wire.REPLY_TOTAL]
    parts = [bytes(data)]
    for i in range(1, wire.piece_count(total, P)):
        meta, piece = ex.fetch(cid, {wire.EXCHANGE: eid, wire.FETCH: i})
        assert meta == {wire.PIECE: i}
        parts.append(bytes(piece))
    reply = b"".join(parts)
    assert hashlib.sha256(reply).hexdigest() == said[wire.REPLY_SHA256]
    return reply


def test_pieces_in_any_order_and_repeated_make_the_request_once():
    handle = Handler()
    ex = PieceExchanges(handle)
    payload = os.urandom(1_050)
    pieces = _pieces("x1", payload)
    random.Random(0).shuffle(pieces)
    answers = [ex.piece(4, info, data) for info, data in [pieces[0], *pieces]]  # the first one twice
    assert [a[0] for a in answers[:-1]] == [{wire.HAVE: n} for n in [1, 1, *range(2, 11)]]
    assert handle.calls == [(4, payload)]
    assert _fetch_all(ex, 4, "x1", answers[-1]) == payload[::-1] * 3
    assert ex.open == {}  # the reply went with its last piece
    with pytest.raises(ValueError, match="no reply of client 4"):
        ex.fetch(4, {wire.EXCHANGE: "x1", wire.FETCH: 1})


def test_a_piece_sent_again_after_the_reply_gets_the_same_answer():
    ex = PieceExchanges(Handler())
    pieces = _pieces("x2", os.urandom(250))
    for info, data in pieces:
        first = ex.piece(1, info, data)
    again = ex.piece(1, *pieces[-1])
    assert again[0] == first[0] and bytes(again[1]) == bytes(first[1])


def test_a_whole_request_in_one_message_gets_its_reply_whole_or_in_pieces():
    ex = PieceExchanges(Handler(grow=1))
    said, reply = ex.piece(2, {wire.EXCHANGE: "s", wire.PIECE_SIZE: P, wire.RUN: RUN}, b"abc")
    assert (said, reply) == ({}, b"cba") and ex.open == {}  # small both ways: nothing kept
    ex.handle = Handler(grow=3)
    first = ex.piece(2, {wire.EXCHANGE: "t", wire.PIECE_SIZE: P, wire.RUN: RUN}, b"yz" * 30)
    assert first[0][wire.REPLY_TOTAL] == 180 and len(first[1]) == P
    assert _fetch_all(ex, 2, "t", first) == b"zy" * 90


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda i, d: ({**i, wire.PIECE: 11}, d), "piece index must be"),
        (lambda i, d: ({**i, wire.PIECE: -1}, d), "piece index must be"),
        (lambda i, d: (i, d + b"x"), "holds 101 bytes, not 100"),
        (lambda i, d: ({**i, wire.TOTAL: 2**41}, d), "declared size"),
        (lambda i, d: ({**i, wire.TOTAL: "1000"}, d), "declared size"),
        (lambda i, d: ({**i, wire.PIECE_SIZE: 0}, d), "piece size"),
        (lambda i, d: ({**i, wire.SHA256: "nope"}, d), "sha256"),
        (lambda i, d: ({**i, wire.EXCHANGE: 5}, d), "exchange id"),
    ],
)
def test_what_a_piece_says_is_checked(change, why):
    ex = PieceExchanges(Handler())
    info, data = _pieces("x3", os.urandom(1_050))[0]
    with pytest.raises(ValueError, match=why):
        ex.piece(0, *change(info, data))


def test_pieces_that_do_not_make_the_declared_request_end_the_exchange():
    handle = Handler()
    ex = PieceExchanges(handle)
    pieces = _pieces("x4", os.urandom(250))
    ex.piece(0, pieces[0][0], pieces[0][1])
    ex.piece(0, pieces[1][0], bytes(len(pieces[1][1])))  # wrong bytes, right length
    with pytest.raises(ValueError, match="sha256"):
        ex.piece(0, *pieces[2])
    assert handle.calls == [] and ex.open == {}
    ex.piece(0, *pieces[0])
    with pytest.raises(ValueError, match="does not belong"):  # a piece of another request under the same id
        ex.piece(0, {**pieces[1][0], wire.TOTAL: 251}, pieces[1][1])


def test_a_request_too_large_or_another_clients_exchange_is_refused():
    ex = PieceExchanges(Handler(), max_request_bytes=1_000)
    with pytest.raises(ValueError, match="declared size"):
        ex.piece(0, *_pieces("x5", os.urandom(1_001))[0])
    with pytest.raises(ValueError, match="exceeds its 100-byte pieces"):
        ex.piece(0, {wire.EXCHANGE: "x6", wire.PIECE_SIZE: P, wire.RUN: RUN}, os.urandom(101))
    info, data = _pieces("x7", os.urandom(300))[0]
    ex.piece(0, info, data)
    with pytest.raises(ValueError, match="is client 0's"):
        ex.piece(1, {**info, wire.PIECE: 1}, data)


def test_a_new_exchange_of_a_client_drops_its_unfinished_one():
    ex = PieceExchanges(Handler())
    ex.piece(0, *_pieces("old", os.urandom(300))[0])
    ex.piece(1, *_pieces("other", os.urandom(300))[0])
    ex.piece(0, *_pieces("new", os.urandom(300))[0])
    assert list(ex.open) == ["other", "new"]


class _Worker:
    def __init__(self, handle):
        self.serve_one, self.pieces = handle, PieceExchanges(handle)


def _ask(worker: _Worker, meta: dict, data: bytes = b"") -> tuple[dict, bytes]:
    """One coordinator message through the node loop's answer: (the reply's meta, its bytes)."""
    from flwr.app import Message

    from fedtune.deploy.node import answer, failure

    msg = Message(wire.pack(data, meta), dst_node_id=5, message_type=wire.MESSAGE_TYPE)
    try:
        reply = answer(msg, worker, "n")
    except Exception as exc:
        reply = failure(msg, exc)
    if reply.has_error():
        raise RuntimeError(reply.error.reason)
    payload, said = wire.unpack(reply.content)
    return said, payload


def test_pieces_cross_the_node_loops_answer(flower_task):
    worker = _Worker(Handler())
    payload = os.urandom(520)
    answers = [_ask(worker, {wire.CLIENT: 3, **info}, data) for info, data in _pieces("s1", payload)]
    said, first = answers[-1]
    parts = [first]
    for i in range(1, wire.piece_count(said[wire.REPLY_TOTAL], P)):
        parts.append(_ask(worker, {wire.CLIENT: 3, wire.EXCHANGE: "s1", wire.FETCH: i})[1])
    assert b"".join(parts) == payload[::-1] * 3
    with pytest.raises(RuntimeError, match="ValueError: no reply of client 3"):
        _ask(worker, {wire.CLIENT: 3, wire.EXCHANGE: "s1", wire.FETCH: 1})
    with pytest.raises(RuntimeError, match="a client id must be an integer"):
        _ask(worker, {wire.CLIENT: -1, wire.RUN: RUN}, b"ab")
    with pytest.raises(RuntimeError, match="not a fedtune run id"):
        _ask(worker, {wire.CLIENT: 3, wire.RUN: "../../etc"}, b"ab")
    assert _ask(worker, {wire.CLIENT: 3, wire.RUN: RUN}, b"ab")[1] == b"bababa"  # a whole request in one message


def test_assembly_refuses_to_allocate_more_than_its_limit_and_hands_out_bytes_once():
    with pytest.raises(ValueError, match="declared size"):
        wire.Assembly(10**15, P, None, limit=10**9)
    a = wire.Assembly(150, P, None, limit=1_000)
    assert a.add(1, b"y" * 50) and not a.add(1, b"z" * 50)  # a repeat is ignored, the first kept
    with pytest.raises(ValueError, match="1 of 2 pieces missing"):
        a.result()
    a.add(0, b"x" * 100)
    assert a.result() == b"x" * 100 + b"y" * 50
    with pytest.raises(ValueError, match="missing"):
        a.result()


def test_the_worker_keeps_no_reply_once_its_last_piece_is_fetched(flower_task):
    import sys

    big = os.urandom(5 * P + 1)
    baseline = sys.getrefcount(big)
    worker = _Worker(lambda c, run, r: big)
    said, _ = _ask(worker, {wire.CLIENT: 0, wire.EXCHANGE: "k", wire.PIECE_SIZE: P, wire.RUN: RUN}, b"q")
    assert said[wire.REPLY_TOTAL] == len(big) and sys.getrefcount(big) > baseline  # held for the fetches
    for i in range(1, 6):
        _ask(worker, {wire.CLIENT: 0, wire.EXCHANGE: "k", wire.FETCH: i})
    assert sys.getrefcount(big) == baseline
