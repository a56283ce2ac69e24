"""Parameter sharing, client side: the reply is the update from what was sent, replayable, well-behaved."""

from dataclasses import replace

import pytest
import torch

from fedtune.client.data import ClientData
from fedtune.config import TrainingConfig
from fedtune.data.builtin.tasks import generate_tasks
from fedtune.data.tokenize import Encoder
from fedtune.paradigms.evaluation import EvalReply, EvalRequest
from fedtune.paradigms.parameter_sharing.messages import TrainReply, TrainRequest
from fedtune.wire.messages import decode_message, encode_message
from tests.helpers.building import ps_handler
from tests.helpers.wire import from_wire, to_wire


def _handler(adapter, tok, **training):
    train, _ = generate_tasks(train_per_task=8, eval_per_task=1)
    enc, _ = Encoder(tok, "chat", None, 96).encode_all(train)
    data = {0: ClientData(enc[:16]), 1: ClientData(enc[16:])}
    cfg = TrainingConfig(local_steps=2, batch_size=4, lr=1e-2, **training)
    return ps_handler(adapter, tok, data, cfg, total_rounds=3, seed=7)


def _train(handler, client, round_index, params):
    blob, _ = handler.handle(client, encode_message(TrainRequest(round=round_index, params=to_wire(params))))
    reply = decode_message(blob, TrainReply)
    return replace(reply, delta=from_wire(reply.delta, params))


def test_reply_is_delta_from_the_sent_params(tiny_adapter, tiny):
    h = _handler(tiny_adapter, tiny.tokenizer)
    glob = tiny_adapter.get_state()
    reply = _train(h, 0, 1, glob)
    local = tiny_adapter.get_state()
    assert reply.status == "ok" and reply.steps == 2 and reply.num_examples == 16
    assert all(torch.equal(reply.delta[k], local[k] - glob[k]) for k in glob)
    assert any(reply.delta[k].abs().sum() > 0 for k in glob)


def test_same_round_and_client_replays_bit_identically(tiny_adapter, tiny):
    h = _handler(tiny_adapter, tiny.tokenizer)
    glob = tiny_adapter.get_state()
    a = _train(h, 1, 2, glob)
    _train(h, 0, 2, glob)  # other work in between must not leak into client 1's round
    b = _train(h, 1, 2, glob)
    c = _train(h, 1, 3, glob)
    assert all(torch.equal(a.delta[k], b.delta[k]) for k in glob)
    assert not all(torch.equal(a.delta[k], c.delta[k]) for k in glob)


def test_unknown_client_is_an_error(tiny_adapter, tiny):
    h = _handler(tiny_adapter, tiny.tokenizer)
    with pytest.raises(KeyError, match="client 9"):
        h.handle(9, encode_message(TrainRequest(round=1, params=to_wire(tiny_adapter.get_state()))))


def test_training_does_not_consume_the_callers_rng(tiny, tiny_adapter):
    h = _handler(tiny_adapter, tiny.tokenizer)
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    _train(h, 0, 1, tiny_adapter.get_state())
    assert torch.equal(torch.rand(1), before)


def test_a_request_of_another_kind_is_refused(tiny_adapter, tiny):
    h = _handler(tiny_adapter, tiny.tokenizer)
    with pytest.raises(ValueError, match="not an expected fedtune message"):
        h.handle(0, encode_message(EvalReply(round=1)))


def test_evaluation_without_a_holdout_replies_no_metrics(tiny_adapter, tiny):
    h = _handler(tiny_adapter, tiny.tokenizer)
    blob, state = h.handle(0, encode_message(EvalRequest(round=1, params=to_wire(tiny_adapter.get_state()))))
    assert decode_message(blob, EvalReply).metrics == {} and state == {}
