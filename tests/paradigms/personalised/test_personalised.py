"""Personalised FL: FedPer/FedRep's split, Ditto's and pFedMe's personal adapters, evaluation of both models."""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedtune.config import load_config
from fedtune.core.errors import ConfigError
from fedtune.core.types import unflatten_state
from fedtune.paradigms.personalised.parts import Freeze, LocalCopy, personal_names
from fedtune.reporting.metrics import TIMED
from tests.helpers.cli import read_metrics, run_tiny
from tests.helpers.configs import TINY_OVERRIDES

ON = ["paradigm.name=personalised", "evaluation.per_client=true", "partition.holdout_fraction=0.25"]
QUIET = ["evaluation.exact_match=false", "federation.rounds=2"]


def _config(*extra: str):
    return load_config("examples/tiny.yaml", [*TINY_OVERRIDES, *ON, *extra, "output.dir=/nonexistent/personal"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["evaluation.per_client=false"], "evaluation.per_client"),
        (["paradigm.method=fedrep", "paradigm.personal_steps=3", "training.local_steps=3"], "leaves none"),
        (["paradigm.method=fedper", "paradigm.personal_steps=2"], "does not apply to fedper"),
        (["paradigm.method=ditto", "paradigm.personal_blocks=2"], "applies to methods fedper and fedrep"),
        (["paradigm.method=pfedme", "paradigm.eta=0.5", "paradigm.lam=4"], "overshoots"),
        (["paradigm.method=fedper", "paradigm.lam=2"], "applies to ditto and pfedme"),
        (["paradigm.method=ditto", "paradigm.eta=0.1"], "applies to pfedme"),
        (["aggregation.scaffold=true"], "SCAFFOLD"),
        (["paradigm.method=fedrep", "privacy.dp_sgd.noise_multiplier=1.0"], "DP-SGD"),
        (["paradigm.method=pfedme", "training.proximal_mu=0.1"], "paradigm.lam"),
        (["paradigm.method=fedper", "paradigm.personal_keys=("], "not a regular expression"),
        (["adapter.client_ranks={0: 4}"], "client_ranks"),
    ],
)
def test_settings_a_method_cannot_use_are_refused_naming_the_key(extra, message):
    with pytest.raises((ValueError, ConfigError)) as err:
        _config(*extra)
    assert message in str(err.value)


@cache
def _built(*extra: str):
    from tests.helpers.building import build

    return build(_config(*QUIET, "partition.num_clients=3", *extra))


def test_the_personal_part_is_the_last_blocks_or_what_a_pattern_matches():
    b = _built("paradigm.method=fedper")
    names, model = sorted(b.bench.initial), b.bench.adapter.model
    last = personal_names(names, model, 1, None)
    assert last and last == {n for n in names if ".layers.1." in n}  # tiny-llama has blocks 0 and 1
    assert personal_names(names, model, 1, r"v_proj") == {n for n in names if "v_proj" in n}
    for blocks, pattern, why in [(2, None, "every"), (1, "nothing-matches", "no adapter"), (1, "lora_A", "splits")]:
        with pytest.raises(ConfigError, match=why):
            personal_names(names, model, blocks, pattern)


def test_freeze_trains_the_first_part_then_only_the_rest():
    from fedtune.client.local_training import optimizer_step

    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([a, b], lr=0.1, weight_decay=0.5)
    freeze = Freeze([True, False], switch=2)
    seen = []
    for _ in range(4):
        before = (a.detach().clone(), b.detach().clone())
        (a.sum() + b.sum()).backward()
        optimizer_step(opt, [a, b], 0.1, [freeze], max_grad_norm=1.0)
        seen.append((not torch.equal(a, before[0]), not torch.equal(b, before[1])))
    assert seen == [(True, False), (True, False), (False, True), (False, True)]


def test_pfedme_local_copy_pulls_theta_and_moves_eta_lam_toward_it():
    theta = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    w0 = torch.tensor([0.0, 0.0])
    copy = LocalCopy([w0], lam=2.0, eta=0.25, every=2)
    loss = copy.extra_loss([theta])
    assert loss.item() == pytest.approx(0.5 * 2.0 * 5.0)  # λ/2 ‖θ − w‖²
    loss.backward()
    assert torch.allclose(theta.grad, 2.0 * (theta.detach() - w0))  # its gradient λ(θ − w)
    copy.after_step([theta], 0.1)
    assert torch.equal(copy.local[0], w0)  # every 2 steps only
    copy.after_step([theta], 0.1)
    assert torch.allclose(copy.local[0], w0 - 0.25 * 2.0 * (w0 - theta.detach()))  # w − ηλ(w − θ)


def _run(tmp_path: Path, name: str, *extra: str) -> Path:
    code, out = run_tiny(tmp_path, *ON, *QUIET, *extra, name=name)
    assert code == 0, out
    return tmp_path / name


def _clients(run: Path) -> dict[int, dict]:
    last = sorted((run / "checkpoints").glob("round_*"))[-1]
    per: dict[int, dict] = {}
    for name, t in load_file(last / "clients.safetensors").items():
        cid, _, key = name.partition("|")
        per.setdefault(int(cid), {})[key] = t
    return {c: unflatten_state(s) for c, s in per.items()}


def test_fedper_shares_only_the_shared_part_and_each_client_keeps_its_own(tmp_path):
    fedavg = read_metrics(_run(tmp_path, "fedavg", "paradigm.name=parameter_sharing"))
    run = _run(tmp_path, "fedper", "paradigm.method=fedper")
    rows = read_metrics(run)
    b = _built("paradigm.method=fedper")
    personal = personal_names(sorted(b.bench.initial), b.bench.adapter.model, 1, None)
    # half the adapter (the last of 2 blocks) never leaves the clients: about half the bytes each way
    for mine, theirs in zip(rows[1:], fedavg[1:], strict=True):
        assert 0.4 < mine["bytes_up"] / theirs["bytes_up"] < 0.6
        assert 0.4 < mine["bytes_down"] / theirs["bytes_down"] < 0.6
    last = sorted((run / "checkpoints").glob("round_*"))[-1]
    assert set(load_file(last / "params.safetensors")).isdisjoint(personal)  # the server holds none of it
    states = _clients(run)
    own = [states[c]["personal"] for c in sorted(states)]
    assert all(set(o) == personal for o in own)
    assert not torch.equal(own[0][sorted(personal)[-1]], own[1][sorted(personal)[-1]])  # each client its own
    # the export completes the shared part with the personal part as every client starts it (LoRA's B: zero)
    exported = load_file(run / "final_adapter" / "adapter_model.safetensors")
    start_b = [t for k, t in exported.items() if ".layers.1." in k and "lora_B" in k]
    assert start_b and not any(t.any() for t in start_b)
    assert any(t.any() for k, t in exported.items() if ".layers.0." in k and "lora_B" in k)
    for r in rows[1:]:  # both models on each client's own held-out share, every round
        assert set(r["client_eval"]) == set(r["personal_eval"]) == {"0", "1", "2", "3"}
        assert math.isfinite(r["personal_eval_loss_mean"])
        assert r["personal_eval_loss_mean"] != r["client_eval_loss_mean"]


def test_dittos_global_model_is_fedavgs_and_its_personal_one_differs(tmp_path):
    fedavg = _run(tmp_path, "fedavg", "paradigm.name=parameter_sharing")
    ditto = _run(tmp_path, "ditto", "paradigm.method=ditto")
    for r in (1, 2):  # Ditto's global training and upload are exactly FedAvg's
        name = f"checkpoints/round_{r:04d}/params.safetensors"
        assert (ditto / name).read_bytes() == (fedavg / name).read_bytes()
    ours, theirs = read_metrics(ditto), read_metrics(fedavg)
    assert [r.get("client_eval") for r in ours] == [r.get("client_eval") for r in theirs]
    assert ours[-1]["personal_eval_loss_mean"] != ours[-1]["client_eval_loss_mean"]
    assert ours[-1]["local_train_s"] > 0 and ours[-1]["client_flops"] > theirs[-1]["client_flops"]  # v's steps too
    b = _built("paradigm.method=ditto")
    assert all(set(s["personal"]) == set(b.bench.initial) for s in _clients(ditto).values())  # a whole adapter v


@pytest.mark.parametrize("method", ["fedrep", "pfedme"])
def test_fedrep_and_pfedme_updates_stay_within_the_auto_bound(tmp_path, method):
    rows = read_metrics(_run(tmp_path, method, f"paradigm.method={method}"))
    assert all(r["dropped"] == {} and len(r["clients"]) == 4 for r in rows[1:])  # no update refused for its size
    assert rows[-1]["personal_eval_loss_mean"] < rows[0]["eval_loss"]


@cache
def _trained_round():
    """Round 1 of a tiny FedPer run with 3 clients: (server half, its state, the clients' handler and states)."""
    from fedtune.paradigms.base import converse
    from fedtune.server.round_loop import Network
    from tests.helpers.served import Served

    b = _built("paradigm.method=fedper")
    server, handler = b.server(lambda params, r, on=None: {}), b.handler()
    served = Served(handler)
    net = Network(served, 1, [0, 1, 2], 1, Path("/nonexistent/personal"))
    state, _ = converse(server.round(1, server.initial_state(), [0, 1, 2]), net.exchange)
    return server, state, handler, served.states


def _hostile_eval(hostile):
    """The evaluation after round 1 of a tiny FedPer run, client 1's reply to the personal evaluation (the
    second exchange) ``hostile(request)``: the evaluation's record."""
    from fedtune.paradigms.base import converse
    from fedtune.server.round_loop import Network
    from tests.helpers.served import Served

    server, state, handler, states = _trained_round()
    served = Served(handler, 1, hostile)
    served.states = dict(states)  # each case from the same trained clients
    net = Network(served, 1, [0, 1, 2], 1, Path("/nonexistent/personal"))
    return converse(server.evaluate(1, state, True), net.exchange)


def _eval_reply(payload: bytes, **fields) -> bytes:
    from fedtune.paradigms.evaluation import EvalReply
    from fedtune.paradigms.personalised.messages import PersonalEvalRequest
    from fedtune.wire.messages import decode_message, encode_message

    req = decode_message(payload, PersonalEvalRequest)
    return encode_message(EvalReply(**{"round": req.round, "metrics": {"loss": 1.0}, **fields}))


@pytest.mark.parametrize(
    "hostile",
    [
        lambda p: _eval_reply(p, metrics={"loss": float("nan")}),
        lambda p: _eval_reply(p, metrics={"accuracy": 1.5}),
        lambda p: _eval_reply(p, metrics={"reward": 0.1}),
        lambda p: _eval_reply(p, round=0),
        lambda p: b"\x00" * 40,
    ],
)
def test_a_hostile_personal_evaluation_drops_only_that_clients_figure(hostile):
    out = _hostile_eval(hostile)
    assert set(out["client_eval"]) == {"0", "1", "2"}
    assert set(out["personal_eval"]) == {"0", "2"}
    assert math.isfinite(out["personal_eval_loss_mean"])


@pytest.mark.slow  # about 30 s: a killed run and its resume, in subprocesses
def test_a_killed_personalised_run_resumes_bit_identically_with_its_personal_adapters(tmp_path):
    from tests.helpers.kill import assert_resume_matches

    args = ["examples/tiny.yaml", *TINY_OVERRIDES, *ON, "evaluation.exact_match=false", "federation.rounds=4"]
    # fedrep: each client's personal block shapes its training and its personal evaluation (replies carry their
    # training time as text: bytes up differ by a few)
    assert_resume_matches([*args, "paradigm.method=fedrep"], tmp_path, {*TIMED, "bytes_up"})


@pytest.mark.parametrize(
    ("extra", "check"),
    [
        # FedPer under secure aggregation: the shared part alone is masked and summed (FFA-LoRA: B trains)
        (
            ["paradigm.method=fedper", "privacy.secure_aggregation={}", "aggregation.lora=ffa"],
            lambda r: r["secagg_summed"] == 4,
        ),
        # Ditto under client-level DP: the global adapter's updates are clipped and noised, v never leaves
        (
            [
                "paradigm.method=ditto",
                "privacy.client_dp=central",
                "privacy.noise_multiplier=0.5",
                "privacy.clip_norm=1",
            ],
            lambda r: r["dp_epsilon"] > 0,
        ),
    ],
)
def test_personalisation_runs_under_secure_aggregation_and_client_dp(tmp_path, extra, check):
    rows = read_metrics(_run(tmp_path, "private", *extra))
    assert all(check(r) and r["dropped"] == {} for r in rows[1:])
    assert all(len(r["personal_eval"]) == 4 for r in rows[1:])
