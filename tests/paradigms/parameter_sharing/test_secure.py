"""Secure aggregation in real parameter-sharing rounds of the tiny model, with the server instrumented."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune.config import load_config
from fedtune.core.errors import RunError
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
from tests.helpers.hostile import (
    SETTINGS,
    byte_mutations,
    decode_parts,
    encode_parts,
    header_mutations,
    mutate_tensor,
    run_category,
)

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


def test_too_few_clients_fail_the_round_rather_than_reveal():
    fed = federation(SECURE, "privacy.secure_aggregation.threshold=1.0")

    def refuse(client, request, reply):
        return b"no" if client == 1 and type(request).__name__ == "ShareKeysRequest" else reply

    def handle(client, payload, state):
        reply, state = fed.handle(client, payload, state)
        return refuse(client, decode_message(payload, *_requests()), reply), state

    net = Network(InProcessRuntime(handle), 1, [0, 1, 2, 3], 1, NOWHERE)
    with pytest.raises(RunError, match="threshold 4"):
        converse(fed.paradigm.round(1, fed.paradigm.initial_state(), [0, 1, 2, 3]), net.exchange)


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


# ---- hostile secure replies, generated -------------------------------------------------------------------


@st.composite
def secure_mutations(draw, blob: bytes) -> bytes:
    """Bytes, header fields, or values / lengths / dtypes of any tensor of a secure-round reply."""
    kind = draw(st.sampled_from(["bytes", "header", "tensor"]))
    if kind == "bytes":
        return draw(byte_mutations(blob))
    if kind == "header":
        return draw(header_mutations(blob))
    tensors, header = decode_parts(blob)
    names = sorted(k for k in tensors if tensors[k].numel())
    if not names:
        return draw(header_mutations(blob))
    name = draw(st.sampled_from(names))
    tensors[name] = mutate_tensor(draw, tensors[name])
    return encode_parts(tensors, header)


def test_any_secure_reply_mutated_drops_its_client_or_passes_its_checks():
    """Client 1's n-th reply (keys, shares, masked input, revealed shares) rewritten as an attacker would.

    Every case ends one of three ways: client 1 dropped with a one-line reason and the round is the one
    without it (dropped before its masked input counted) or with it (after); or the reply passed every check
    and the model is finite (a well-formed lie in a masked input changes the sum: secure aggregation cannot
    see it); or a well-formed but wrong revealed share stops the unmasking with a RunError naming it (the
    last checkpoint intact). Nothing else escapes.
    """
    fed = federation(SECURE)
    whole = fed.round()[0].params
    without = _round_without_1(fed)

    @settings(SETTINGS, max_examples=int(os.environ.get("FEDTUNE_SECURE_HOSTILE_CASES", 60)))
    @given(data=st.data())
    def case(data):
        at = data.draw(st.integers(0, 3), label="reply")
        sent = [0]

        def handle(client, payload, state):
            if client != 1:
                return fed.handle(client, payload, state)
            try:  # client 1 is the attacker's: after its lie, its own code may refuse what follows
                reply, state = fed.handle(client, payload, state)
            except ValueError:
                return b"", state
            if sent[0] == at:
                reply = data.draw(secure_mutations(reply))
            sent[0] += 1
            return reply, state

        net = Network(InProcessRuntime(handle), 1, [0, 1, 2, 3], 1, NOWHERE)
        try:
            state, _ = converse(fed.paradigm.round(1, fed.paradigm.initial_state(), [0, 1, 2, 3]), net.exchange)
        except RunError as exc:  # a well-formed lie in shares given (1) or revealed (3)
            assert at in (1, 3) and "secure aggregation could not unmask" in str(exc), (at, exc)
            return
        assert set(net.dropped) <= {1}, net.dropped
        if 1 in net.dropped:
            why = net.dropped[1]
            assert why and "\n" not in why and len(why) <= 400, why
            expected = whole if at == 3 else without  # its masked input counts once it arrived
            assert all(torch.equal(state.params[k], expected[k]) for k in expected)
        else:
            assert all(torch.isfinite(t).all() for t in state.params.values())

    run_category(case)


def _round_without_1(fed: Federation):
    """The round where client 1 leaves right after its keys (its masked input never counts)."""

    def handle(client, payload, state):
        reply, state = fed.handle(client, payload, state)
        if client == 1 and type(decode_message(payload, *_requests())).__name__ == "ShareKeysRequest":
            return b"gone", state
        return reply, state

    net = Network(InProcessRuntime(handle), 1, [0, 1, 2, 3], 1, NOWHERE)
    return converse(fed.paradigm.round(1, fed.paradigm.initial_state(), [0, 1, 2, 3]), net.exchange)[0].params
