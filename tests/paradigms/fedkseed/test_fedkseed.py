"""FedKSeed: zeroth-order steps along K candidate seeds, (index, amount) pairs on the wire, every party replaying."""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedtune.client.zeroth_order import replay_
from fedtune.config import load_config
from fedtune.paradigms.base import BadReply
from fedtune.paradigms.fedkseed.messages import KSeedReply, KSeedRequest
from fedtune.paradigms.fedkseed.settings import candidate_seeds
from fedtune.paradigms.fedkseed.steps import digest, ordered, pairs
from fedtune.reporting.metrics import TIMED
from tests.helpers.cli import read_metrics, run_tiny
from tests.helpers.configs import TINY_OVERRIDES
from tests.helpers.kill import assert_resume_matches

KSEED = ("paradigm.name=fedkseed", "training.gradient=zeroth_order", "training.lr=1e-2", "training.local_steps=6")


def _run(tmp_path, name, *extra):
    code, out = run_tiny(tmp_path, *KSEED, *extra, name=name)
    assert code == 0, out
    return read_metrics(tmp_path / name)


def test_a_round_costs_bytes_not_weights_and_the_global_weights_are_the_replayed_steps(tmp_path):
    rows = _run(tmp_path, "ks")
    for rec in rows[1:]:
        assert rec["dropped"] == {} and "kseed_caught_up" not in rec
        per_client = (rec["bytes_up"] + rec["bytes_down"]) / len(rec["clients"])
        assert per_client < 2_000  # six steps: a few hundred bytes each way (FedKSeed's budget: 18 KB)
        assert rec["client_flops"] > 0  # the forward passes' analytic FLOPs, reported and checked
    assert rows[-1]["eval_loss"] != rows[0]["eval_loss"]
    # the final adapter is the initial one moved by the checkpointed steps, replayed: nothing else moved it
    run = tmp_path / "ks" / "checkpoints"
    last = run / (run / "LATEST").read_text().strip()
    state = load_file(str(last / "aggregator.safetensors"))
    final = load_file(str(last / "params.safetensors"))
    cfg = load_config("examples/tiny.yaml", [*TINY_OVERRIDES, *KSEED, f"output.dir={tmp_path}"])
    from fedtune.assembly import build_workbench, plan_of

    initial = {k: v.clone() for k, v in build_workbench(cfg, plan_of(cfg), announce=False).initial.items()}
    assert state["counts"].tolist() == [r["kseed_indices"] for r in rows[1:]]
    replay_(ordered(initial), pairs(state["index"], state["amount"], candidate_seeds(cfg.seed, 4096)))
    assert all(torch.equal(initial[k], final[k]) for k in final)


@pytest.mark.slow  # about 30 s: a killed run and its resume, in subprocesses
def test_a_killed_fedkseed_run_resumes_bit_identically(tmp_path):
    args = ["examples/tiny.yaml", *KSEED, "federation.rounds=5", "training.local_steps=20"]
    # the restarted process answers "behind" once and is sent every step: bytes and the catch-up differ
    assert_resume_matches(args, tmp_path, {*TIMED, "bytes_up", "bytes_down", "kseed_caught_up"})


# ---- the client: catching up, behind, a digest that does not match


def _pieces(tmp_path):
    return _built()


@cache
def _built():
    """(plan, workbench, client data, server and client builders) of the tiny FedKSeed run, built once."""
    from fedtune.assembly import build_client_data, build_workbench, plan_of
    from fedtune.data.prepare import prepare_federated_data
    from fedtune.paradigms.fedkseed.setup import client, server

    cfg = load_config("examples/tiny.yaml", [*TINY_OVERRIDES, *KSEED, "output.dir=/nonexistent/fedkseed"])
    plan = plan_of(cfg)
    bench = build_workbench(cfg, plan, announce=False)
    data = prepare_federated_data(cfg.data, cfg.partition, cfg.split_seed())
    return plan, bench, build_client_data(data, bench.encoder, cfg), server, client


def _drive(srv, state, r, clients, answer):
    """One server round, each request answered by ``answer(client, request)``."""
    from fedtune.paradigms.base import Replies

    conv = srv.round(r, state, clients)
    ex = next(conv)
    try:
        while True:
            accepted, dropped = {}, {}
            for c, req in ex.messages.items():
                try:
                    accepted[c] = ex.read(c, answer(c, req))
                except BadReply as why:
                    dropped[c] = str(why)
            ex = conv.send(Replies(accepted, dropped))
    except StopIteration as done:
        return done.value


def test_a_fresh_process_is_sent_every_step_it_lacks_and_rebuilds_the_servers_weights(tmp_path):
    plan, bench, shares, server, client = _pieces(tmp_path)
    srv, cl = server(plan, bench, None, None), client(plan, bench, shares)
    state = srv.initial_state()
    for r in (1, 2, 3):
        state, metrics = _drive(srv, state, r, [0, 1], lambda c, req: cl.serve(c, req, {})[0])
        assert metrics["kseed_indices"] > 0
    fresh = client(plan, bench, shares)  # a restarted process: it holds round 0
    req = srv._request(4, state.algorithm, int(state.algorithm.held[0]), digest(state.params))
    assert isinstance(req, KSeedRequest) and req.since == 2
    assert fresh.serve(0, req, {})[0].status == "behind" and fresh.serve(0, req, {})[0].holds == 0
    whole = srv._request(4, state.algorithm, 0, digest(state.params))
    reply = fresh.serve(0, whole, {})[0]
    assert reply.status == "ok" and fresh.held_round == 3 and digest(fresh.held) == digest(state.params)
    # a digest its replay cannot reach: diverged, with the reason, and the process starts over
    wrong = KSeedRequest(4, 3, "0" * 64)
    bad = client(plan, bench, shares)
    bad.held_round, bad.held = 3, {k: v.clone() for k, v in state.params.items()}
    out = bad.serve(0, wrong, {})[0]
    assert out.status == "diverged" and "digest" in out.error and bad.held_round == 0
    # steps that do not cover the rounds they claim to are refused before any is applied
    gap = bad.serve(0, KSeedRequest(5, 0, "0" * 64), {})[0]
    assert gap.status == "diverged" and "do not cover" in gap.error and bad.held_round == 0


# ---- the server: what a reply must be before it counts

GOOD = {
    "index": torch.tensor([1, 5, 9], dtype=torch.int32),
    "amount": torch.tensor([0.01, -0.02, 0.0], dtype=torch.float32),
}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"index": torch.tensor([1.0, 5.0, 9.0])}, "int32"),
        ({"index": torch.tensor([5, 1, 9], dtype=torch.int32)}, "increase"),
        ({"index": torch.tensor([1, 1, 9], dtype=torch.int32)}, "increase"),
        ({"index": torch.tensor([1, 5, 4096], dtype=torch.int32)}, "increase"),
        ({"index": torch.tensor([-1, 5, 9], dtype=torch.int32)}, "increase"),
        ({"amount": torch.tensor([0.01, float("nan"), 0.0])}, "not finite"),
        ({"amount": torch.tensor([0.01, 1e9, 0.0])}, "exceeds"),
        ({"amount": torch.tensor([0.01, 0.02])}, "amounts"),
        ({"index": torch.arange(1000, dtype=torch.int32), "amount": torch.zeros(1000)}, "at most"),
        ({"steps": 10**6}, "steps"),
        ({"train_loss": float("inf")}, "train_loss"),
        ({"num_examples": -3}, "example"),
        ({"round": 7}, "stale"),
        ({"status": "behind", "holds": 9}, "holds round"),
        ({"status": "diverged", "error": "boom"}, "boom"),
        ({"peak_bytes": -1}, "peak_bytes"),
        ({"flops": float("nan")}, "flops"),
        ({"flops": 1e30}, "flops"),
    ],
)
def test_a_reply_that_is_not_what_an_honest_client_sends_drops_it_with_the_reason(tmp_path, change, reason):
    plan, bench, _shares, server, _ = _pieces(tmp_path)
    srv = server(plan, bench, None, None)
    conv = srv.round(1, srv.initial_state(), [0])
    ex = next(conv)
    good = KSeedReply(1, **GOOD, num_examples=10, num_tokens=50, steps=6, train_loss=1.0)
    assert ex.read(0, good) is good
    fields = {**good.__dict__, **change}
    with pytest.raises(BadReply, match=reason):
        ex.read(0, KSeedReply(**fields))


def test_fedkseed_needs_zeroth_order_training(tmp_path):
    code, out = run_tiny(tmp_path, "paradigm.name=fedkseed")
    assert code != 0 and "training.gradient=zeroth_order" in out


# ---- the real path: a hostile reply in a round with real clients drops only its client


def _real_round(hostile=None):
    """Round 1 with clients 0..2 on fresh client processes, client 1's reply ``hostile(request)``: (dropped, params)."""
    from fedtune.paradigms.base import converse
    from fedtune.server.round_loop import Network
    from tests.helpers.building import build
    from tests.helpers.configs import tiny_config
    from tests.helpers.served import Served

    b = build(tiny_config(*KSEED, "partition.num_clients=3", "evaluation.exact_match=false"))
    server = b.server(lambda params, r, on=None: {})
    net = Network(Served(b.handler(), 0, hostile), 1, [0, 1, 2], 1, Path("/nonexistent/fedkseed"))
    state, _ = converse(server.round(1, server.initial_state(), [0, 1, 2]), net.exchange)
    return net.dropped, state.params


def _mutated(payload: bytes, **fields) -> bytes:
    from fedtune.wire.messages import decode_message, encode_message

    req = decode_message(payload, KSeedRequest)
    good = {"round": req.round, **GOOD, "num_examples": 10, "num_tokens": 50, "steps": 6, "train_loss": 1.0}
    return encode_message(KSeedReply(**{**good, **fields}))


@pytest.mark.parametrize(
    ("hostile", "reason"),
    [
        (lambda p: _mutated(p, index=torch.tensor([3, 2], dtype=torch.int32), amount=torch.zeros(2)), "increase"),
        (lambda p: _mutated(p, amount=torch.tensor([1e30, 0.0, 0.0])), "exceeds"),
        (lambda p: _mutated(p, status="behind", holds=1), "holds round"),
        (lambda p: b"\x00" * 40, "unreadable"),
        (lambda p: _mutated(p, round=0), "stale"),
    ],
)
def test_a_hostile_reply_through_the_wire_drops_only_its_client(hostile, reason):
    dropped, params = _real_round(hostile)
    assert list(dropped) == [1] and reason in dropped[1], dropped
    assert all(torch.isfinite(v).all() for v in params.values())


def test_a_client_behind_again_after_it_was_sent_every_step_is_dropped(tmp_path):
    from fedtune.paradigms.base import Replies

    plan, bench, _shares, server, _ = _pieces(tmp_path)
    srv = server(plan, bench, None, None)
    conv = srv.round(1, srv.initial_state(), [0])
    ex = next(conv)
    behind = KSeedReply(1, status="behind", holds=0)
    ex = conv.send(Replies({0: ex.read(0, behind)}, {}))  # behind: the server sends from round 0
    assert ex.messages[0].since == 0
    with pytest.raises(BadReply, match="still cannot train"):
        ex.read(0, behind)


# ---- FedKSeed-Pro: candidates sampled by the size of their past amounts


def test_importance_is_the_softmax_of_min_max_scaled_mean_amplitudes():
    from fedtune.paradigms.fedkseed.steps import Amplitudes

    amps = Amplitudes(4)
    amps.add(torch.tensor([0, 2], dtype=torch.int32), torch.tensor([0.5, -2.0]))  # round 1
    amps.add(torch.tensor([2, 3], dtype=torch.int32), torch.tensor([1.0, 0.3]))  # round 2
    psi = torch.tensor([0.5 / 2, 0.0, 3.0 / 3, 0.3 / 2], dtype=torch.float64)  # a 0 counted first for each
    expected = torch.softmax((psi - psi.min()) / (psi.max() - psi.min()), 0)
    assert torch.allclose(torch.from_numpy(amps.probabilities()), expected, atol=1e-9)
    assert amps.probabilities()[2] / amps.probabilities()[1] == pytest.approx(math.e, rel=1e-6)  # at most e apart
    assert torch.allclose(torch.from_numpy(Amplitudes(3).probabilities()), torch.full((3,), 1 / 3, dtype=torch.float64))


def test_fedkseed_pro_draws_candidates_by_importance_from_the_steps_it_replayed(tmp_path):
    rows = _run(tmp_path, "pro", "paradigm.sampling=importance", "paradigm.candidates=8", "federation.rounds=3")
    assert all(r["dropped"] == {} for r in rows[1:]) and rows[-1]["eval_loss"] != rows[0]["eval_loss"]
    # the client's choices follow the weights it is given: all mass on one candidate, every step takes it
    from fedtune.assembly import build_client_data, build_workbench, plan_of
    from fedtune.client.trainer import LocalTrainer
    from fedtune.data.prepare import prepare_federated_data

    cfg = load_config("examples/tiny.yaml", [*TINY_OVERRIDES, *KSEED, f"output.dir={tmp_path}"])
    bench = build_workbench(cfg, plan_of(cfg), announce=False)
    data = build_client_data(prepare_federated_data(cfg.data, cfg.partition, cfg.split_seed()), bench.encoder, cfg)
    trainer = LocalTrainer(cfg.training, 3, cfg.seed, bench.tokenizer.pad_token_id)
    out = trainer.train(bench.adapter, 0, 1, data[0], candidates=[11, 12, 13], weights=[0.0, 1.0, 0.0])
    assert out.zo_choices == (1,) * 6 and {s.seed for s in out.zo_steps} == {12}
