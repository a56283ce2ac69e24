"""Secure aggregation in real parameter-sharing rounds of the tiny model, with the server instrumented."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch

from fedtune.config import load_config
from fedtune.paradigms.base import converse
from fedtune.paradigms.parameter_sharing.messages import TrainReply
from fedtune.paradigms.parameter_sharing.secure_client import OWNER
from fedtune.paradigms.parameter_sharing.secure_messages import (
    MaskedInputReply,
    ShareKeysReply,
    UnmaskReply,
    UnmaskRequest,
)
from fedtune.runtime.in_process import InProcessRuntime
from fedtune.server.round_loop import Network
from fedtune.wire.messages import decode_message
from tests.helpers.building import build
from tests.helpers.configs import TINY_OVERRIDES

REPLIES = (TrainReply, ShareKeysReply, MaskedInputReply, UnmaskReply)
NOWHERE = Path("/nonexistent/secure")


@dataclass
class Federation:
    cfg: Any
    paradigm: Any
    handle: Any  # (client, payload, state) -> (reply, state)

    def round(self, r: int = 1, tamper=None, clients=(0, 1, 2, 3)):
        """One round with every reply recorded (decoded) as the server received it; (state, metrics, seen, runtime)."""
        seen: list[tuple[int, Any]] = []

        def handle(client, payload, state):
            reply, state = self.handle(client, payload, state)
            if tamper is not None:
                reply = tamper(client, decode_message(payload, *_requests()), reply)
            seen.append((client, decode_message(reply, *REPLIES)))
            return reply, state

        runtime = InProcessRuntime(handle)
        net = Network(runtime, r, list(clients), 1, NOWHERE)
        state, metrics = converse(self.paradigm.round(r, self.paradigm.initial_state(), list(clients)), net.exchange)
        return state, metrics, seen, runtime, net


def _requests():
    from fedtune.paradigms.parameter_sharing.client import ParameterSharingClient

    return ParameterSharingClient.serves


@cache
def federation(*extra: str) -> Federation:
    cfg = load_config(
        "examples/tiny.yaml", [*TINY_OVERRIDES, "training.local_steps=1", f"output.dir={NOWHERE}", *extra]
    )
    built = build(cfg)
    handle, paradigm = built.handler().handle, built.server()
    return Federation(cfg, paradigm, handle)


SECURE = "privacy.secure_aggregation={}"


def test_the_sum_equals_plain_fedavg_up_to_the_fixed_point_step():
    secure, _, _, _, _ = federation(SECURE).round()
    plain, _, _, _, _ = federation("aggregation.lora=ffa", "aggregation.weighting=uniform").round()
    step = 2.0**-16
    for k in plain.params:
        diff = (secure.params[k] - plain.params[k]).abs().max().item()
        assert diff <= step / 2 + 1e-7, (k, diff)  # the mean of 4 values each rounded by half a step
    assert any(not torch.equal(secure.params[k], federation(SECURE).paradigm.initial[k]) for k in plain.params)


def test_the_server_never_holds_an_individual_update():
    """Every reply the server got, decoded: no update in the clear, and each masked input unlike its update."""
    fed = federation(SECURE)
    _, metrics, seen, runtime, _ = fed.round()
    assert metrics["secagg_summed"] == 4 and metrics["secagg_clipped_values"] == 0
    kinds = [type(m).__name__ for _, m in seen]
    assert kinds.count("TrainReply") == kinds.count("ShareKeysReply") == kinds.count("MaskedInputReply") == 4
    n = sum(t.numel() for t in fed.paradigm.initial.values())
    for _, msg in seen:
        if isinstance(msg, TrainReply):
            assert msg.delta == {} and sorted(msg.secagg_keys) == ["c_pk", "s_pk"]
        if any(t.numel() >= n for t in _tensors(msg)):
            assert isinstance(msg, MaskedInputReply)  # only the masked input is update-sized
    # the clients' own encoded updates, recomputed from what they held before masking, never arrived
    updates = _client_updates(fed)
    for client, msg in seen:
        if isinstance(msg, MaskedInputReply):
            y = msg.masked.to(torch.int64) + 2**31
            assert (y == updates[client]).float().mean() < 0.01
    assert all(OWNER not in s or set(s[OWNER]) <= {"noise_seed"} for s in runtime.client_states().values())


def test_a_client_gone_after_masking_still_counts_and_the_sum_is_exact():
    fed = federation(SECURE)
    whole, _, _, _, _ = fed.round()

    def handle(client, payload, state):
        reply, state = fed.handle(client, payload, state)
        if client == 2 and isinstance(decode_message(payload, *_requests()), UnmaskRequest):
            return b"gone", state  # killed after sending its masked input
        return reply, state

    net = Network(InProcessRuntime(handle), 1, [0, 1, 2, 3], 1, NOWHERE)
    state, metrics = converse(fed.paradigm.round(1, fed.paradigm.initial_state(), [0, 1, 2, 3]), net.exchange)
    assert list(net.dropped) == [2] and metrics["secagg_summed"] == 4
    assert all(torch.equal(state.params[k], whole.params[k]) for k in whole.params)  # the same sum, to the bit


def test_too_few_clients_skip_the_rounds_update_rather_than_reveal():
    fed = federation(SECURE, "privacy.secure_aggregation.threshold=1.0")

    def refuse(client, request, reply):
        return b"no" if client == 1 and type(request).__name__ == "ShareKeysRequest" else reply

    def handle(client, payload, state):
        reply, state = fed.handle(client, payload, state)
        return refuse(client, decode_message(payload, *_requests()), reply), state

    net = Network(InProcessRuntime(handle), 1, [0, 1, 2, 3], 1, NOWHERE)
    state, metrics = converse(fed.paradigm.round(1, fed.paradigm.initial_state(), [0, 1, 2, 3]), net.exchange)
    assert metrics["secagg_skipped"] == 1 and "threshold 4" in metrics["secagg_skip_reason"]
    assert all(torch.equal(state.params[k], t) for k, t in fed.paradigm.initial.items())


def test_secure_rounds_cost_more_bytes_and_say_how_many():
    _, _, _, _, secure = federation(SECURE).round()
    _, _, _, _, plain = federation("aggregation.lora=ffa", "aggregation.weighting=uniform").round()
    up_s, up_p = secure.bytes["train"][1], plain.bytes["train"][1]
    assert up_s > up_p  # keys, ciphertexts, masked input (int32) and shares on top of one update


def _tensors(msg) -> list[torch.Tensor]:
    out = []
    for name in type(msg).TENSORS:
        value = getattr(msg, name)
        out += [value] if isinstance(value, torch.Tensor) else list(value.values())
    return out


def _client_updates(fed: Federation) -> dict[int, torch.Tensor]:
    """Each client's fixed-point update as it held it before masking (its state after the train request)."""
    out = {}

    def handle(client, payload, state):
        reply, state = fed.handle(client, payload, state)
        if OWNER in state and "x" in state[OWNER]:
            out.setdefault(client, state[OWNER]["x"].clone())
        return reply, state

    net = Network(InProcessRuntime(handle), 1, [0, 1, 2, 3], 1, NOWHERE)
    converse(fed.paradigm.round(1, fed.paradigm.initial_state(), [0, 1, 2, 3]), net.exchange)
    assert sorted(out) == [0, 1, 2, 3]
    return out
