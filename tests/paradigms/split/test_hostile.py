"""Hostile split replies, generated: any of client 1's replies in a round, mutated as an attacker would.

A split round is a conversation of many exchanges, so a mutation can land on any of them: the first
activations, a gradient mid-step, the final update. Each case runs a real round of the tiny model
(two clients, two optimizer steps of two micro-batches) through the round loop's ``Network``, with
client 1's ``n``-th reply rewritten by the mutations of the parameter-sharing suite (bytes, header
fields, codec meta and packed tensors) or by hostile values in its plain tensors (attention mask,
labels). Every case must end with client 1 dropped with a one-line reason and the round exactly what
client 0 alone makes (server part included), or with the reply still passing every check and a
finite model. A category's peak memory is bounded as in the parameter-sharing suite.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune.config import load_config
from fedtune.paradigms.base import converse
from fedtune.runtime.in_process import InProcessRuntime
from fedtune.server.round_loop import Network
from tests.helpers.building import build
from tests.helpers.configs import TINY_OVERRIDES
from tests.helpers.hostile import (
    SETTINGS,
    byte_mutations,
    decode_parts,
    encode_parts,
    header_mutations,
    meta_mutations,
    mutate_tensor,
    run_category,
)

CASES = int(os.environ.get("FEDTUNE_SPLIT_HOSTILE_CASES", 30))  # per setting: each case is a whole round
SLOW_CASES = 400  # per setting in the slow set (.ci/run): 1,200 mutated split rounds in all
SETUPS = {
    "u shared": ["paradigm.server_part=shared"],
    "u per_client": ["paradigm.server_part=per_client"],
    "vanilla": ["paradigm.shape=vanilla", "paradigm.client_front=2"],
}
OVERRIDES = [
    *TINY_OVERRIDES,
    "model.name=tiny-llama-deep",
    "partition.method=iid",
    "partition.num_clients=2",
    "training.local_steps=2",
    "training.grad_accum=2",
    "training.batch_size=2",
    "data.max_seq_len=32",
    "evaluation.every=0",
    "evaluation.exact_match=false",
    "paradigm=split",
]


@dataclass
class SplitRound:
    """A split paradigm and its clients, ready to run round 1; with what the honest rounds gave."""

    paradigm: Any
    handle: Any  # the real client handler: (client, payload, state) -> (reply, state)
    alone: dict[str, torch.Tensor]  # params after a round with client 0 alone
    replies: int  # how many replies client 1 sends in an honest round

    def run(self, tamper=None) -> tuple[dict[str, torch.Tensor], dict[int, str]]:
        """Round 1 with clients 0 and 1; ``tamper(n, blob) -> blob`` rewrites client 1's ``n``-th reply."""
        sent = [0]

        def handle(client, payload, state):
            reply, state = self.handle(client, payload, state)
            if client == 1 and tamper is not None:
                reply = tamper(sent[0], reply)
                sent[0] += 1
            return reply, state

        return self._round(handle, [0, 1])

    def _round(self, handle, clients):
        net = Network(InProcessRuntime(handle), 1, clients, 1, _nowhere())
        state, _ = converse(self.paradigm.round(1, self.paradigm.initial_state(), clients), net.exchange)
        return state.params, net.dropped


def _nowhere():
    from pathlib import Path

    return Path("/nonexistent/split-hostile")  # only named in a quorum error, which these rounds never reach


@cache
def split_round(setup: str) -> SplitRound:
    cfg = load_config("examples/quickstart.yaml", [*OVERRIDES, *SETUPS[setup], f"output.dir={_nowhere()}"])
    built = build(cfg)
    handler, paradigm = built.handler().handle, built.server()
    fed = SplitRound(paradigm, handler, {}, 0)
    fed.alone, dropped = fed._round(handler, [0])
    assert not dropped
    counted = []
    both, dropped = fed.run(lambda n, blob: counted.append(n) or blob)
    assert not dropped and not _same(both, fed.alone)  # client 1 counts: a drop is visible
    fed.replies = len(counted)
    return fed


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@st.composite
def plain_tensor_mutations(draw, blob: bytes) -> bytes:
    """Hostile values, lengths or dtypes in a reply's plain tensors (attention mask, labels)."""
    tensors, header = decode_parts(blob)
    plain = sorted(k for k in tensors if "/" not in k and tensors[k].numel())
    if not plain:
        return draw(header_mutations(blob))
    name = draw(st.sampled_from(plain))
    shape = tensors[name].shape
    t = mutate_tensor(draw, tensors[name]).reshape(-1)
    tensors[name] = t.reshape(shape) if t.numel() == shape.numel() and draw(st.booleans()) else t
    return encode_parts(tensors, header)


@st.composite
def split_mutations(draw, blob: bytes) -> bytes:
    has_meta = any(k.endswith("/meta") for k in decode_parts(blob)[0])
    kinds = ["bytes", "header", "plain", *(["meta"] if has_meta else [])]
    kind = draw(st.sampled_from(kinds))
    if kind == "bytes":
        return draw(byte_mutations(blob))
    if kind == "header":
        return draw(header_mutations(blob))
    if kind == "meta":
        return draw(meta_mutations(blob))
    return draw(plain_tensor_mutations(blob))


def check_outcome(fed: SplitRound, params: dict[str, torch.Tensor], dropped: dict[int, str]) -> None:
    assert set(dropped) <= {1}, dropped
    if 1 in dropped:
        why = dropped[1]
        assert why and "\n" not in why and "\r" not in why and len(why) <= 400, why
        assert _same(params, fed.alone)  # no trace of client 1, in the client part or the server part
    else:
        assert all(torch.isfinite(t).all() for t in params.values())


@pytest.mark.parametrize("cases", [CASES, pytest.param(SLOW_CASES, marks=pytest.mark.slow)])
@pytest.mark.parametrize("setup", list(SETUPS))
def test_any_reply_of_a_round_mutated_drops_its_client_or_passes_every_check(setup, cases):
    fed = split_round(setup)

    @settings(SETTINGS, max_examples=cases)
    @given(data=st.data())
    def case(data):
        at = data.draw(st.integers(0, fed.replies - 1), label="reply")
        params, dropped = fed.run(lambda n, blob: data.draw(split_mutations(blob)) if n == at else blob)
        check_outcome(fed, params, dropped)

    run_category(case)


@pytest.mark.parametrize("setup", list(SETUPS))
def test_an_unmutated_round_repeats_to_the_bit(setup):
    """The suite's baseline: honest rounds are deterministic, so a difference above is the mutation's."""
    fed = split_round(setup)
    first, dropped = fed.run()
    again, _ = fed.run()
    assert not dropped and _same(first, again)
    assert fed.replies == (5 if setup == "vanilla" else 7)  # see test_server's round-trip count
