"""The split server reads every reply as untrusted: a bad one drops its client, and leaves no trace."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fedtune.config import load_config
from fedtune.paradigms.base import converse
from fedtune.paradigms.split.messages import Activations, BackReply, Done
from fedtune.runtime.in_process import InProcessRuntime
from fedtune.server.round_loop import Network
from fedtune.wire.messages import decode_message, encode_message
from tests.helpers.building import build
from tests.helpers.configs import TINY_OVERRIDES

TWO_CLIENTS = [
    *TINY_OVERRIDES,
    "model.name=tiny-llama-deep",
    "partition.method=iid",
    "partition.num_clients=2",
    "training.local_steps=2",
    "training.grad_accum=2",
    "evaluation.every=0",
    "evaluation.exact_match=false",
    "paradigm=split",
]
KINDS = (Activations, BackReply, Done)
ALONE: dict[str, tuple] = {}  # server_part -> the round with client 0 alone (what every bad case must equal)


def _round(tmp_path, overrides, clients, tamper=None):
    """One round with these clients; ``tamper(message) -> message`` rewrites client 1's replies."""
    cfg = load_config("examples/quickstart.yaml", [*TWO_CLIENTS, *overrides, f"output.dir={tmp_path}"])
    built = build(cfg)
    handler, paradigm = built.handler().handle, built.server()

    def handle(client, payload, state):
        reply, state = handler(client, payload, state)
        if client == 1 and tamper is not None:
            reply = encode_message(tamper(decode_message(reply, *KINDS)))
        return reply, state

    net = Network(InProcessRuntime(handle), 1, clients, 1, tmp_path)
    state, metrics = converse(paradigm.round(1, paradigm.initial_state(), clients), net.exchange)
    return state.params, net.dropped, metrics


def _hidden(msg, change, field=None):
    """``msg`` with its wire tensor ``h`` (plain float32: no codecs) changed by ``change(tensor)``."""
    field = field or ("hidden" if isinstance(msg, Activations) else "grad")
    wire = dict(getattr(msg, field))
    (key,) = [k for k in wire if k != "meta"]
    import json
    import zlib

    meta = json.loads(zlib.decompress(wire["meta"].numpy().tobytes()))
    ((name, shape),) = meta["layout"][key]
    value = change(wire[key].reshape(shape).clone())
    meta["layout"][key] = [[name, list(value.shape)]]
    packed = zlib.compress(json.dumps(meta).encode())
    wire.update({key: value.reshape(-1), "meta": torch.frombuffer(bytearray(packed), dtype=torch.uint8)})
    return dataclasses.replace(msg, **{field: wire})


def _at(kind, step, change):
    def tamper(msg):
        if isinstance(msg, kind) and (step is None or msg.step == step):
            return change(msg)
        return msg

    return tamper


def _nan(t):
    t[0, 0, 0] = math.nan
    return t


CASES = {
    "wider hidden states": (
        _at(Activations, 2, lambda m: _hidden(m, lambda t: torch.cat([t, t[..., :1]], -1))),
        "hidden states of shape",
    ),
    "wider hidden states carried with a gradient": (
        _at(BackReply, 0, lambda m: _hidden(m, lambda t: torch.cat([t, t[..., :1]], -1), "next_hidden")),
        "hidden states of shape",
    ),
    "no activations where the step goes on": (
        _at(
            BackReply, 2, lambda m: dataclasses.replace(m, next_hidden={}, next_mask=torch.zeros(0, dtype=torch.uint8))
        ),
        "sent no activations for micro-batch 3",
    ),
    "activations after the step's end": (
        _at(BackReply, 1, lambda m: dataclasses.replace(m, next_mask=torch.ones(1, 1, dtype=torch.uint8))),
        "sent activations for micro-batch 2",
    ),
    "NaN in hidden states": (_at(Activations, 0, lambda m: _hidden(m, _nan)), "NaN or Inf"),
    "a step out of turn": (
        _at(Activations, 2, lambda m: dataclasses.replace(m, step=3)),
        "micro-batch 3, expected round 1 micro-batch 2",
    ),
    "a mask of 2s": (
        _at(Activations, 0, lambda m: dataclasses.replace(m, attention_mask=m.attention_mask * 2)),
        "not 0/1",
    ),
    "more examples than any client": (
        _at(Activations, 0, lambda m: dataclasses.replace(m, num_examples=10**9)),
        "training examples",
    ),
    "a gradient of the wrong shape": (
        _at(BackReply, 2, lambda m: _hidden(m, lambda t: t[:, :-1])),
        "gradient at the second cut",
    ),
    "an infinite loss": (_at(BackReply, 1, lambda m: dataclasses.replace(m, loss_sum=math.inf)), "diverged"),
    "no norm for clipping": (
        _at(Done, None, lambda m: dataclasses.replace(m, client_sq_norm=None)),
        "squared gradient norm",
    ),
    "a negative norm": (_at(Activations, 2, lambda m: dataclasses.replace(m, client_sq_norm=-1.0)), "client_sq_norm"),
    "the wrong round": (_at(Done, None, lambda m: dataclasses.replace(m, round=7)), "answered round 7"),
    "a reply of another kind": (_at(BackReply, 0, lambda m: Done(1, {}, 1, 0.0, 0.0)), "where a BackReply was due"),
}


@pytest.mark.parametrize("server_part", ["shared", "per_client"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_reply_drops_its_client_and_the_round_is_what_the_others_made(tmp_path, case, server_part):
    tamper, why = CASES[case]
    overrides = [f"paradigm.server_part={server_part}"]
    params, dropped, _ = _round(tmp_path / "bad", overrides, [0, 1], tamper)
    assert set(dropped) == {1} and why in dropped[1], dropped
    if server_part not in ALONE:
        ALONE[server_part] = _round(tmp_path / "alone", overrides, [0])
    alone, dropped_alone, _ = ALONE[server_part]
    assert not dropped_alone
    assert all(torch.equal(params[k], alone[k]) for k in alone)  # client 1 left no trace, server part included


def test_vanilla_labels_outside_the_vocabulary_drop_the_client(tmp_path):
    def bad_labels(msg):
        labels = msg.labels.clone()
        labels[0, -1] = 10**6
        return dataclasses.replace(msg, labels=labels)

    overrides = ["paradigm.shape=vanilla", "paradigm.client_front=2"]
    _, dropped, _ = _round(tmp_path, overrides, [0, 1], _at(Activations, 1, bad_labels))
    assert "labels outside the vocabulary" in dropped[1]
    fewer = _at(Activations, 0, lambda m: dataclasses.replace(m, step_tokens=m.step_tokens + 1))
    _, dropped, _ = _round(tmp_path / "tokens", overrides, [0, 1], fewer)
    assert "step tokens" in dropped[1] or "labels hold" in dropped[1]


def test_an_honest_round_reports_its_costs(tmp_path):
    _, dropped, metrics = _round(tmp_path, [], [0, 1])
    assert not dropped
    assert metrics["local_micro_batches"] == 2 * 4 and metrics["local_steps"] == 2 * 2
    assert metrics["activation_codec_error"] == 0.0 and math.isfinite(metrics["train_loss"])
    _, _, compressed = _round(tmp_path / "bf16", ["paradigm.activation_codecs=[{name: bf16}]"], [0, 1])
    assert 0 < compressed["activation_codec_error"] < 1e-2  # bf16 keeps about 3 significant digits


@pytest.mark.parametrize(("shape", "trips"), [("u", 2 * (2 + 1) + 1), ("vanilla", 4 + 1)])
def test_a_step_of_a_micro_batches_costs_a_plus_one_round_trips_in_u_and_a_in_vanilla(tmp_path, shape, trips):
    """2 optimizer steps of 2 micro-batches: u pipelines within a step (the next activations ride with a
    gradient), so A + 1 round trips a step, not 2A; vanilla carries each gradient in the next request. The
    last one is the round's Done."""
    kinds = []
    overrides = [f"paradigm.shape={shape}", *(["paradigm.client_front=2"] if shape == "vanilla" else [])]
    _, dropped, _ = _round(tmp_path, overrides, [0, 1], lambda m: kinds.append(type(m).__name__) or m)
    assert not dropped and len(kinds) == trips, kinds
    if shape == "u":
        assert kinds == ["Activations", "BackReply", "BackReply"] * 2 + ["Done"]


def _scaled(factor):
    """A Done whose client-part update (plain float32 on the wire) is ``factor`` times what it trained."""

    def change(msg):
        delta = {k: t * factor if t.is_floating_point() else t for k, t in msg.delta.items()}
        return dataclasses.replace(msg, delta=delta)

    return change


@pytest.mark.parametrize("factor", [1e6, 3e38], ids=["x1e6", "3e38"])
def test_the_client_parts_update_is_held_to_max_update_norm(tmp_path, factor):
    overrides = ["aggregation.max_update_norm=1"]
    params, dropped, _ = _round(tmp_path, overrides, [0, 1], _at(Done, None, _scaled(factor)))
    assert "max_update_norm" in dropped[1] or "NaN or Inf" in dropped[1], dropped
    assert all(torch.isfinite(t).all() for t in params.values())


def test_the_server_parts_change_in_a_session_is_held_to_max_update_norm(tmp_path):
    """Gradients at the second cut x 1e4 with plain SGD move the server part far: the session is refused."""
    overrides = ["aggregation.max_update_norm=1", "training.optimizer=sgd", "training.max_grad_norm=null"]
    big, still = _at(BackReply, None, lambda m: _hidden(m, lambda t: t * 1e4)), _at(Done, None, _scaled(0.0))
    params, dropped, _ = _round(tmp_path, overrides, [0, 1], lambda m: still(big(m)))  # its own part kept still
    assert "moved the server part" in dropped[1], dropped
    alone, dropped_alone, _ = _round(tmp_path / "alone", overrides, [0])
    assert not dropped_alone and all(torch.equal(params[k], alone[k]) for k in alone)  # its turn undone


def test_the_config_not_the_client_caps_a_rounds_micro_batches(tmp_path):
    """A client that reports a million examples (as many as a deployment allows) gets the config's micro-batches."""
    from fedtune.config.training import TrainingConfig
    from fedtune.paradigms.split.steps import StepPlan

    epochs = TrainingConfig(local_steps=None, local_epochs=1, batch_size=2)
    assert StepPlan.of(epochs, 3, 1, 10**6, 1000).count == 1000
    assert StepPlan.of(epochs, 3, 1, 10, 1000).count == 5
    kinds = []
    overrides = ["paradigm.max_micro_batches=3"]  # the round's 2 steps of 2 micro-batches: 3 of them
    _, dropped, metrics = _round(tmp_path, overrides, [0, 1], lambda m: kinds.append(type(m).__name__) or m)
    assert not dropped and metrics["local_micro_batches"] == 2 * 3
