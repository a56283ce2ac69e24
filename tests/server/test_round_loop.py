"""The round loop with a fake runtime: clients are plain functions of (client id, request)."""

import logging

import pytest
import torch

from fedtune.aggregation import fedavg
from fedtune.errors import RunError
from fedtune.runtime.in_process import InProcessRuntime
from fedtune.server.checkpoint import ServerState, load_latest
from fedtune.server.round_loop import LoopSettings, run_rounds
from fedtune.types import TrainReply
from fedtune.wire.messages import decode_message, encode_message
from tests.wire_helpers import to_wire

PARAMS = {"w": torch.zeros(4)}


def _client(bad=()):
    """Client c adds c+1 to every weight; clients in `bad` diverge."""

    def handle(cid, blob, state):
        req = decode_message(blob)
        common = dict(round=req.round, num_examples=cid + 1, num_tokens=10, steps=1, train_loss=1.0, local_train_s=0.01)
        if cid in bad:
            return encode_message(TrainReply(delta={}, status="diverged", error="non-finite loss", **common)), state
        return encode_message(TrainReply(delta=to_wire({"w": torch.full((4,), float(cid + 1))}), **common)), state

    return handle


def _run(tmp_path, handler, rounds=2, min_clients=1, start=None):
    state = start or ServerState(0, dict(PARAMS), fedavg().init(PARAMS), [])
    s = LoopSettings(rounds, 3, 3, min_clients, seed=0, progress=False)
    return run_rounds(state, InProcessRuntime(handler), fedavg(), s, tmp_path)


def test_fedavg_rounds_and_records(tmp_path):
    final = _run(tmp_path, _client())
    # weights 1,2,3 on deltas 1,2,3: mean = (1 + 4 + 9) / 6 per round
    assert torch.allclose(final.params["w"], torch.full((4,), 2 * 14 / 6))
    rec = final.history[-1]
    assert rec["clients"] == [0, 1, 2] and rec["dropped"] == {}
    assert rec["bytes_up"] > 3 * 16 and rec["bytes_down"] > 3 * 16
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
        req = decode_message(blob)
        delta = {"w": torch.full((4,), float("inf"))} if cid == 0 else {"w": torch.ones(4)}
        if cid == 1:
            delta = {"w": torch.ones(5)}
        return encode_message(
            TrainReply(
                round=req.round,
                delta=to_wire(delta),
                num_examples=1,
                num_tokens=1,
                steps=1,
                train_loss=0.0,
                local_train_s=0.0,
            )
        ), state

    final = _run(tmp_path, handle, rounds=1)
    assert final.history[-1]["clients"] == [2]
    assert "NaN or Inf" in final.history[-1]["dropped"]["0"] and "shape" in final.history[-1]["dropped"]["1"]
    assert torch.equal(final.params["w"], torch.ones(4))


def test_update_over_the_norm_bound_is_rejected(tmp_path):
    state = ServerState(0, dict(PARAMS), fedavg().init(PARAMS), [])
    s = LoopSettings(1, 3, 3, 1, seed=0, progress=False, max_update_norm=5.0)
    final = run_rounds(state, InProcessRuntime(_client()), fedavg(), s, tmp_path)
    # client c sends c+1 in 4 coordinates: norms 2, 4, 6 -> client 2 is over the bound
    assert final.history[-1]["clients"] == [0, 1]
    assert "exceeds aggregation.max_update_norm=5" in final.history[-1]["dropped"]["2"]
