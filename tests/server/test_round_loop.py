"""The round loop with fake clients: plain functions of (client id, request bytes, state)."""

import logging
from dataclasses import dataclass, replace
from typing import ClassVar, NamedTuple

import pytest
import torch

from fedtune.aggregation import fedavg
from fedtune.aggregation.weighting import WeightCap
from fedtune.core.errors import RunError
from fedtune.core.types import Envelope, ServerState
from fedtune.paradigms.base import BadReply, Exchange
from fedtune.paradigms.parameter_sharing.messages import TrainReply, TrainRequest
from fedtune.paradigms.parameter_sharing.server import ParameterSharing, SharingSettings
from fedtune.runtime.in_process import InProcessRuntime
from fedtune.server.checkpoint import load_latest
from fedtune.server.round_loop import LoopSettings, run_rounds
from fedtune.wire.messages import decode_message, encode_message
from fedtune.wire.serialize import encode
from tests.helpers.wire import to_wire

PARAMS = {"w": torch.zeros(4)}


def _reply(req, cid, delta=None, **changes):
    common = dict(round=req.round, num_examples=cid + 1, num_tokens=10, steps=1, train_loss=1.0, local_train_s=0.01)
    delta = {"w": torch.full((4,), float(cid + 1))} if delta is None else delta
    return encode_message(TrainReply(delta=to_wire(delta), **{**common, **changes}))


def _client(bad=()):
    """Client c adds c+1 to every weight; clients in `bad` diverge."""

    def handle(cid, blob, state):
        req = decode_message(blob, TrainRequest)
        if cid in bad:
            common = dict(round=req.round, num_examples=1, num_tokens=1, steps=1, train_loss=1.0, local_train_s=0.0)
            return encode_message(TrainReply(delta={}, status="diverged", error="non-finite loss", **common)), state
        return _reply(req, cid), state

    return handle


def _paradigm(**settings):
    return ParameterSharing(fedavg(), SharingSettings(3, 0, **settings), dict(PARAMS))


def _run(tmp_path, handler, rounds=2, min_clients=1, start=None, runtime=None, **settings):
    paradigm = _paradigm(**settings)
    state = start or paradigm.initial_state()
    s = LoopSettings(rounds, 3, 3, min_clients, seed=0, progress=False)
    return run_rounds(state, runtime or InProcessRuntime(handler), paradigm, s, tmp_path)


def test_fedavg_rounds_and_records(tmp_path):
    final = _run(tmp_path, _client())
    # weights 1,2,3 on deltas 1,2,3: mean = (1 + 4 + 9) / 6 per round
    assert torch.allclose(final.params["w"], torch.full((4,), 2 * 14 / 6))
    rec = final.history[-1]
    assert rec["clients"] == [0, 1, 2] and rec["dropped"] == {}
    assert rec["bytes_up"] > 3 * 16 and rec["bytes_down"] > 3 * 16
    assert [r["round"] for r in final.history] == [0, 1, 2]
    assert load_latest(tmp_path, fedavg().init(PARAMS)).round == 2


def test_diverged_client_is_dropped_and_logged(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        final = _run(tmp_path, _client(bad={1}))
    assert final.history[-1]["clients"] == [0, 2]
    assert "non-finite loss" in final.history[-1]["dropped"]["1"]
    assert "dropped client 1" in caplog.text
    assert torch.allclose(final.params["w"], torch.full((4,), 2 * 10 / 4))


def test_too_few_clients_stops_with_checkpoint_intact(tmp_path):
    first = _run(tmp_path, _client(), rounds=1)
    with pytest.raises(RunError) as err:
        _run(tmp_path, _client(bad={0, 1}), rounds=2, min_clients=2, start=first)
    assert "only 1 of 3 clients" in str(err.value) and "round_0001" in str(err.value)
    kept = load_latest(tmp_path, fedavg().init(PARAMS))
    assert kept.round == 1 and torch.equal(kept.params["w"], first.params["w"])


def test_malformed_update_never_reaches_the_model(tmp_path):
    def handle(cid, blob, state):
        req = decode_message(blob, TrainRequest)
        delta = {0: {"w": torch.full((4,), float("inf"))}, 1: {"w": torch.ones(5)}}.get(cid, {"w": torch.ones(4)})
        return _reply(req, cid, delta, num_examples=1), state

    final = _run(tmp_path, handle, rounds=1)
    assert final.history[-1]["clients"] == [2]
    assert "NaN or Inf" in final.history[-1]["dropped"]["0"] and "shape" in final.history[-1]["dropped"]["1"]
    assert torch.equal(final.params["w"], torch.ones(4))


def test_finite_updates_that_sum_past_the_float_range_are_never_applied_or_checkpointed(tmp_path):
    def handle(cid, blob, state):  # every update finite (float32 max is 3.4e38), two rounds of them are not
        req = decode_message(blob, TrainRequest)
        return _reply(req, cid, {"w": torch.full((4,), 3e38)}), state

    with pytest.raises(RunError, match=r"round 2: the new global adapter is not finite.*round 1's checkpoint"):
        _run(tmp_path, handle, rounds=2)
    kept = load_latest(tmp_path, fedavg().init(PARAMS))
    assert kept.round == 1 and torch.equal(kept.params["w"], torch.full((4,), 3e38))
    assert not (tmp_path / "checkpoints" / "round_0002").exists()


def test_update_over_the_norm_bound_is_rejected(tmp_path):
    final = _run(tmp_path, _client(), rounds=1, max_update_norm=5.0)
    # client c sends c+1 in 4 coordinates: norms 2, 4, 6 -> client 2 is over the bound
    assert final.history[-1]["clients"] == [0, 1]
    assert "exceeds aggregation.max_update_norm=5" in final.history[-1]["dropped"]["2"]


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        (lambda req, cid: b"\x00\x01garbage", "unreadable reply"),
        (lambda req, cid: b"", "unreadable reply"),
        (lambda req, cid: encode({}, {"kind": "train_reply", "round": "1"}), "unreadable reply"),
        (lambda req, cid: _reply(req, cid, num_examples=-5), "positive number"),
        (lambda req, cid: _reply(req, cid, round=req.round - 1), "stale reply"),
        (lambda req, cid: encode({}, {"kind": "x" * 10_000}), "not an expected fedtune message"),
    ],
)
def test_any_unusable_reply_drops_only_its_client(tmp_path, reply, why):
    def handle(cid, blob, state):
        req = decode_message(blob, TrainRequest)
        return (reply(req, cid) if cid == 1 else _reply(req, cid)), state

    final = _run(tmp_path, handle, rounds=1)
    assert final.history[-1]["clients"] == [0, 2]
    assert why in final.history[-1]["dropped"]["1"]


def test_a_claimed_weight_counts_at_most_the_cap(tmp_path):
    def handle(cid, blob, state):  # client 2 claims 10**30 examples to replace the average with its update
        req = decode_message(blob, TrainRequest)
        return _reply(req, cid, num_examples=10**30 if cid == 2 else 1), state

    final = _run(tmp_path, handle, rounds=1, weight_cap=WeightCap(max_examples=2, max_seq_len=8))
    assert final.history[-1]["clients"] == [0, 1, 2]
    assert torch.allclose(final.params["w"], torch.full((4,), (1 + 2 + 2 * 3) / 4))  # weights 1, 1, 2


def test_a_reply_larger_than_any_honest_one_is_dropped_before_it_is_parsed(tmp_path, monkeypatch):
    parsed = []
    monkeypatch.setattr("fedtune.server.round_loop.decode_message", lambda *a: parsed.append(1) or decode_message(*a))

    def handle(cid, blob, state):  # a 4-value update needs ~135 KB at most (headers included); 1 is sent 1 MB
        req = decode_message(blob, TrainRequest)
        return (b"\x00" * 1_000_000 if cid == 1 else _reply(req, cid)), state

    final = _run(tmp_path, handle, rounds=1)
    assert final.history[-1]["clients"] == [0, 2] and len(parsed) == 2
    assert "a reply of 1,000,000 bytes, more than the 135,232 it can need" in final.history[-1]["dropped"]["1"]
    assert final.history[-1]["bytes_up"] > 1_000_000  # it crossed the wire: counted


def test_a_client_error_text_cannot_forge_log_lines_or_flood_the_log(tmp_path, caplog):
    forged = "ok\n2026-11-30 12:00:00 INFO round 1: client 0 accepted\r\x1b[2J" + "A" * 100_000

    def handle(cid, blob, state):
        req = decode_message(blob, TrainRequest)
        if cid != 1:
            return _reply(req, cid), state
        common = dict(round=req.round, num_examples=1, num_tokens=1, steps=1, train_loss=1.0, local_train_s=0.0)
        return encode_message(TrainReply(delta={}, status="diverged", error=forged, **common)), state

    with caplog.at_level(logging.WARNING):
        final = _run(tmp_path, handle, rounds=1)
    why = final.history[-1]["dropped"]["1"]
    assert "\n" not in why and "\r" not in why and "\x1b" not in why and len(why) < 400
    assert "ok\\n2026-11-30" in why and "100,0" in why  # escaped, and says how long the text was
    lines = [r.getMessage() for r in caplog.records if "dropped client 1" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]


class _Impostor:
    """A runtime whose replies also claim clients that were not asked, or answer twice."""

    def __init__(self):
        self.inner = InProcessRuntime(_client())

    def send_and_receive(self, envelopes, delivery=None):
        replies = self.inner.send_and_receive(envelopes)
        forged = replies[0].payload
        return [*replies, Envelope(0, forged), Envelope(7, forged), Envelope(1, forged)]

    def client_states(self):
        return {}

    def load_client_states(self, states):
        pass

    def close(self):
        pass


def test_a_client_counts_once_and_unasked_replies_are_ignored(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        final = _run(tmp_path, None, rounds=1, runtime=_Impostor())
    assert final.history[-1]["clients"] == [0, 1, 2]
    assert torch.allclose(final.params["w"], torch.full((4,), 14 / 6))  # as without the forged replies
    assert "client 7's: that client was not asked" in caplog.text and "already replied" in caplog.text


# ---------------------------------------------------------------- a two-exchange paradigm


@dataclass(frozen=True)
class Ping:
    KIND: ClassVar[str] = "ping"
    TENSORS: ClassVar[tuple[str, ...]] = ()
    round: int
    step: int


@dataclass(frozen=True)
class Pong:
    KIND: ClassVar[str] = "pong"
    TENSORS: ClassVar[tuple[str, ...]] = ()
    round: int
    step: int
    value: float


class Count(NamedTuple):
    total: float = 0.0


class TwoStep:
    """Each round: ask every client, then ask again only those that answered the first time."""

    name = "two_step"

    def initial_state(self):
        return ServerState(0, {}, Count())

    def round(self, r, state, clients):
        def read(c, reply):
            if reply.value < 0:
                raise BadReply("negative")
            return reply.value

        first = yield Exchange("train", {c: Ping(r, 0) for c in clients}, Pong, read, 4096)
        second = yield Exchange("train", {c: Ping(r, 1) for c in first.accepted}, Pong, read, 4096)
        total = state.algorithm.total + sum(second.accepted.values())
        return replace(state, algorithm=Count(total)), {"answered": sorted(second.accepted)}

    def evaluate(self, r, state, per_client):
        return {"total": state.algorithm.total}
        yield  # a conversation with no exchange


def _pong(fail_step=None, who=None):
    def handle(cid, blob, state):
        ping = decode_message(blob, Ping)
        value = -1.0 if (ping.step == fail_step and cid == who) else float(cid)
        return encode_message(Pong(ping.round, ping.step, value)), state

    return handle


def test_a_conversation_of_several_exchanges_drops_a_client_for_the_rest_of_its_round(tmp_path):
    s = LoopSettings(2, 3, 3, 1, seed=0, progress=False)
    final = run_rounds(TwoStep().initial_state(), InProcessRuntime(_pong(0, 2)), TwoStep(), s, tmp_path, lambda r: True)
    rec = final.history[-1]
    assert rec["answered"] == [0, 1] and rec["clients"] == [0, 1] and rec["dropped"] == {"2": "negative"}
    assert final.algorithm.total == 2 * (0 + 1) and rec["total"] == 2.0
    assert rec["bytes_down"] > 0 and rec["bytes_up"] > 0  # both exchanges counted


def test_the_quorum_is_checked_after_every_exchange(tmp_path):
    s = LoopSettings(1, 3, 3, 3, seed=0, progress=False)
    with pytest.raises(RunError, match="only 2 of 3 clients"):
        run_rounds(TwoStep().initial_state(), InProcessRuntime(_pong(1, 0)), TwoStep(), s, tmp_path)
