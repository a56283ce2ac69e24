"""KD's server: consensus from good replies; any malformed reply drops only its client, with the reason."""

from __future__ import annotations

import pytest
import torch

from fedtune.data.formats import from_instruction
from fedtune.data.tokenize import Encoder
from fedtune.paradigms.kd.distributions import id_dtype
from fedtune.paradigms.kd.messages import LOGP, KDReply, KDRequest
from fedtune.paradigms.kd.public import PublicSet, round_slice
from fedtune.paradigms.kd.server import KDSettings, KnowledgeDistillation
from fedtune.runtime.in_process import InProcessRuntime
from fedtune.server.round_loop import LoopSettings, run_rounds
from fedtune.wire.link import Link
from fedtune.wire.messages import decode_message, encode_message

V, K, SLICE = 260, 4, 3


@pytest.fixture(scope="module")
def public(tiny_tokenizer):
    examples = [from_instruction(f"Say {w}.", w) for w in ("apple", "river", "stone", "cloud", "music", "garden")]
    encoded, _ = Encoder(tiny_tokenizer, "chat", None, 64).encode_all(examples)
    return PublicSet(examples, encoded, "test", "d1g35t")


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from fedtune.models.tiny import build_byte_tokenizer

    return build_byte_tokenizer()


def _paradigm(public, downlink="logits", weighting="uniform"):
    settings = KDSettings(downlink, K, K, SLICE, weighting, 3, V, seed=0)
    initial = {"w": torch.zeros(2)} if downlink == "adapter" else {}
    distil = (lambda p, idx, top, r: ({"w": p["w"] + 1}, 0.5)) if downlink == "adapter" else None
    return KnowledgeDistillation(settings, public, initial, Link(), Link(), None, distil)


def _top(rows: int, client: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Client c puts 0.5 on token c, then 0.2, 0.1, 0.05 on the next tokens."""
    ids = torch.tensor([[client, client + 1, client + 2, client + 3]] * rows)
    logp = torch.tensor([[0.5, 0.2, 0.1, 0.05]] * rows).log()
    return ids, logp


def _client(public, tamper=None):
    def handle(cid, blob, state):
        req = decode_message(blob, KDRequest)
        rows = public.positions(req.score)
        ids, logp = _top(rows, cid)
        fields = dict(round=req.round, ids=ids.to(id_dtype(V)), logp={LOGP: logp}, num_examples=10)
        if tamper is not None and cid == 1:
            fields = tamper(fields, rows)
        wire = Link().encode(fields.pop("logp"), {}, torch.Generator())[0] if isinstance(fields["logp"], dict) else {}
        common = dict(steps=1, train_loss=1.0, distill_loss=None, local_train_s=0.0)
        return encode_message(KDReply(logp=wire, **{**common, **fields})), state

    return handle


def _run(tmp_path, public, handler, rounds=2, **kw):
    paradigm = _paradigm(public, **kw)
    s = LoopSettings(rounds, 3, 3, 1, seed=0, progress=False)
    return run_rounds(paradigm.initial_state(), InProcessRuntime(handler), paradigm, s, tmp_path)


def test_consensus_of_good_replies_is_kept_and_sent_back(tmp_path, public):
    final = _run(tmp_path, public, _client(public))
    state = final.algorithm
    rows = public.positions(round_slice(0, 2, SLICE, len(public)))
    assert state.ids.shape == (rows, K) and state.slice.tolist() == round_slice(0, 2, SLICE, len(public)).tolist()
    # three clients: token 2 is in everyone's top-4 (0.1, 0.2, 0.5): the most agreed-on
    assert state.ids[0, 0].item() == 2
    assert final.history[-1]["clients"] == [0, 1, 2] and final.history[-1]["kd_positions"] == rows
    assert final.history[-1]["bytes_down"] > final.history[1]["bytes_down"]  # round 2 carries the consensus


def test_adapter_downlink_distils_on_the_server(tmp_path, public):
    final = _run(tmp_path, public, _client(public), downlink="adapter")
    assert torch.equal(final.params["w"], torch.full((2,), 2.0))  # one server distillation per round
    assert final.history[-1]["server_distill_loss"] == 0.5


def _with(**changes):
    return lambda fields, rows: {**fields, **changes}


@pytest.mark.parametrize(
    ("tamper", "why"),
    [
        (lambda f, rows: {**f, "ids": f["ids"][:-1]}, "expected torch.uint16"),  # one position short
        (lambda f, rows: {**f, "ids": f["ids"].to(torch.int64)}, "token ids are torch.int64"),
        (lambda f, rows: {**f, "ids": torch.full((rows, K), 300, dtype=torch.uint16)}, "outside the vocabulary"),
        (lambda f, rows: {**f, "ids": torch.zeros(rows, K, dtype=torch.uint16)}, "repeats within"),
        (lambda f, rows: {**f, "logp": {LOGP: torch.full((rows, K), float("nan"))}}, "not finite"),
        (lambda f, rows: {**f, "logp": {LOGP: torch.full((rows, K), 0.5)}}, "exceeds 1"),
        (lambda f, rows: {**f, "logp": {LOGP: torch.full((rows, K + 1), -3.0)}}, "log-probabilities are"),
        (lambda f, rows: {**f, "logp": {}}, "cannot decode"),
        (lambda f, rows: {**f, "round": 0}, "stale reply"),
    ],
)
def test_a_malformed_reply_drops_its_client_and_the_run_goes_on(tmp_path, public, tamper, why, caplog):
    final = _run(tmp_path, public, _client(public, tamper))
    for rec in final.history[1:]:
        assert rec["clients"] == [0, 2]
        assert why in rec["dropped"]["1"]
    assert "dropped client 1" in caplog.text


def test_examples_weighting_needs_a_positive_count(tmp_path, public):
    final = _run(tmp_path, public, _client(public, _with(num_examples=0)), weighting="examples")
    assert "positive number" in final.history[-1]["dropped"]["1"]


def test_probabilities_summing_over_one_are_rescaled_not_dropped(tmp_path, public):
    """int8/int4 on the uplink can push an honest row's mass a little over 1: it is used, as a distribution."""
    over = lambda f, rows: {**f, "logp": {LOGP: torch.tensor([[0.0, -1.0, -2.0, -3.0]] * rows)}}  # noqa: E731
    final = _run(tmp_path, public, _client(public, over))
    assert final.history[-1]["clients"] == [0, 1, 2]
    state = final.algorithm
    assert torch.isfinite(state.logp).all() and float(state.logp.exp().sum(dim=1).max()) <= 1 + 1e-5


def test_huge_weights_cannot_turn_the_consensus_into_nan(tmp_path, public):
    final = _run(tmp_path, public, _client(public, _with(num_examples=10**38)), weighting="examples")
    assert final.history[-1]["clients"] == [0, 1, 2] and torch.isfinite(final.algorithm.logp).all()
    # client 1 outweighs the others by 1e37: the consensus is its distribution
    assert final.algorithm.ids[0, 0].item() == 1
