"""One config, three runtimes: in_process (in forked lanes), a Ray pool, and a Flower deployment of real
processes; one case per paradigm (and per protocol that changes the conversation).

Same seed, 3 clients, 2 rounds on a tiny model: the last checkpoint's server state (params and algorithm
state) must be bit-identical on every runtime, and so must every round's losses and byte counts down.
Holds on CPU because every client's computation is a pure function of (config, seed, round, client id)
and the server sums in client-id order. A paradigm is one row of CASES; its own checks, where it has
any beyond that, one function. The deployment half is in the slow set (`pytest -m slow`, which
`.ci/run` runs).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.cli import read_metrics as _history
from tests.helpers.deployment import Federation

pytest.importorskip("ray")
pytest.importorskip("flwr")

SAME = ("train_loss", "eval_loss", "bytes_down", "clients")


def _last_checkpoint(run_dir: Path) -> dict[str, bytes]:
    last = sorted((run_dir / "checkpoints").glob("round_*"))[-1]
    return {name: (last / name).read_bytes() for name in ("params.safetensors", "aggregator.safetensors")}


def _deployed_state(tmp_path: Path, c: int) -> dict:
    from fedtune.core.types import unflatten_state

    runs = list((tmp_path / "runs" / f"fed.client-client-{c}").glob("run-*"))  # one run: its state, per run
    assert len(runs) == 1, runs
    stored = sorted((runs[0] / f"client-{c}").glob("round-*.safetensors"))
    return unflatten_state(load_file(stored[-1]))


def _parameter_sharing(tmp_path: Path, runs: dict[str, Path], fed: Federation) -> None:
    assert "refused" not in fed.output("server")
    # replies carry their training time as text: a few bytes of jitter
    for got, ref in zip(_history(runs["flower"])[1:], _history(runs["in_process"])[1:], strict=True):
        assert abs(got["bytes_up"] - ref["bytes_up"]) <= 3 * 8
    # each deployed client kept its own error-feedback residual on its own disk
    assert all(_deployed_state(tmp_path, c).get("residual") for c in range(3))


def _same_client_state(tmp_path: Path, runs: dict[str, Path], owner: str) -> None:
    """Every deployed client's ``owner`` state, on its own disk, is the one the simulation kept for it."""
    from fedtune.core.types import unflatten_state

    last = sorted((runs["in_process"] / "checkpoints").glob("round_*"))[-1]
    simulated: dict[int, dict] = {}
    for name, t in load_file(last / "clients.safetensors").items():
        cid, _, key = name.partition("|")
        simulated.setdefault(int(cid), {})[key] = t
    for c in range(3):
        own, ref = _deployed_state(tmp_path, c)[owner], unflatten_state(simulated[c])[owner]
        assert own.keys() == ref.keys() and all(torch.equal(own[k], ref[k]) for k in own), c


def _kd(tmp_path: Path, runs: dict[str, Path], fed: Federation) -> None:
    """Every deployed client's own adapter, on its own disk, is the one the simulation kept for it."""
    _same_client_state(tmp_path, runs, "kd")


def _secure(tmp_path: Path, runs: dict[str, Path], fed: Federation) -> None:
    for name, run in runs.items():
        rows = _history(run)[1:]
        assert all(r["secagg_summed"] == 3 for r in rows), name
        assert [r["dp_epsilon"] for r in rows] == [r["dp_epsilon"] for r in _history(runs["in_process"])[1:]]


def _offsite(tmp_path: Path, runs: dict[str, Path], fed: Federation) -> None:
    """Each deployed client built the emulator it was sent, once, and never loaded a model of its own; after the
    first round only the re-aligned middle went down."""
    for c in range(3):
        out = fed.output(f"client-{c}")
        assert out.count("emulator built") == 1 and "loaded in" not in out, out
    assert "model tiny-llama-deep loaded in" in fed.output("server")
    for run in runs.values():
        down = [r["bytes_down"] for r in _history(run)[1:]]
        assert down[0] > 2 * down[1], down


def _fedkseed(tmp_path: Path, runs: dict[str, Path], fed: Federation) -> None:
    """A few hundred bytes a client each way, nobody dropped or out of step."""
    for name, run in runs.items():
        for r in _history(run)[1:]:
            assert r["dropped"] == {} and r["bytes_up"] + r["bytes_down"] < 1_000 * len(r["clients"]), (name, r)


def _personalised(tmp_path: Path, runs: dict[str, Path], fed: Federation) -> None:
    """Every deployed client's personal block, on its own disk, is the one the simulation kept for it; both
    models were evaluated on every client's held-out share, with the same figures."""
    _same_client_state(tmp_path, runs, "personal")
    figures = [[(r.get("client_eval"), r.get("personal_eval")) for r in _history(run)[1:]] for run in runs.values()]
    assert all(f == figures[0] for f in figures) and all(len(p or {}) == 3 for _, p in figures[0])


def _dpo(tmp_path: Path, runs: dict[str, Path], fed: Federation) -> None:
    """Every run scored the held-out pairs after every round, with the same figures."""
    figures = [[r.get("eval_reward_accuracy") for r in _history(run)[1:]] for run in runs.values()]
    assert all(f == figures[0] for f in figures) and None not in figures[0]


# name -> (settings over tests.helpers.deployment.BASE, the case's own checks)
CASES: dict[str, tuple[dict, Callable | None]] = {
    # int8 + error feedback up (client state), bf16 down (a dtype numpy would lose)
    "parameter_sharing": (
        {"compression": {"uplink": ["int8"], "error_feedback": True, "downlink": ["bf16"]}},
        _parameter_sharing,
    ),
    # KD with logits on the downlink: no adapter crosses the wire, each client keeps its own (client state)
    "kd": (
        {
            "paradigm": {"name": "kd", "top_k": 4, "public_slice": 6, "distill_steps": 2, "distill_batch_size": 3},
            "data": {"builtin": {"public_per_task": 8}},
            "compression": {"uplink": ["fp16"], "downlink": ["bf16"]},
            "evaluation": {"exact_match": False},
        },
        _kd,
    ),
    # split learning U-shaped on the shared server part (the sampled clients take turns), 2 micro-batches in
    # one optimizer step (activations ride with a gradient), bf16 activations: the client's round state
    # travels with each exchange (Ray) or stays with the deployed client
    "split": (
        {
            "paradigm": {
                "name": "split",
                "shape": "u",
                "server_part": "shared",
                "activation_codecs": [{"name": "bf16"}],
            },
            "model": {"name": "tiny-llama-deep"},
            "training": {"local_steps": 1, "grad_accum": 2},
            "evaluation": {"exact_match": False},
            "federation": {"rounds": 2, "clients_per_round": 2},
        },
        None,
    ),
    # split learning vanilla on a server part per client (the sampled clients' conversations interleave), the
    # client's two blocks live between exchanges where the same process serves them
    "split_per_client": (
        {
            "paradigm": {"name": "split", "shape": "vanilla", "client_front": 2, "server_part": "per_client"},
            "model": {"name": "tiny-llama-deep"},
            "training": {"local_steps": 2},
            "evaluation": {"exact_match": False},
            "federation": {"rounds": 2, "clients_per_round": 2},
        },
        None,
    ),
    # distributed DP under secure aggregation: four exchanges a round, each deployed client keeping its round's
    # secrets in its own state store between them
    "secure": (
        {
            "privacy": {
                "client_dp": "distributed",
                "noise_multiplier": 0.8,
                "clip_norm": 0.05,
                "secure_aggregation": {"threshold": 0.6},
                "noise_seed": 3,
            }
        },
        _secure,
    ),
    # offsite-tuning (FedBiOT): each client process is sent the distilled emulator once (asked by digest every
    # round) and builds it from its config alone, then the re-aligned middle alone; forked lanes and Ray workers
    # keep a client where its emulator is
    "offsite": (
        {
            "paradigm": {
                "name": "offsite",
                "bottom": 1,
                "top": 1,
                "emulator": "distil",
                "distil": {"steps": 3},
                "realign": {"steps": 2},
            },
            "model": {"name": "tiny-llama-deep"},
            "data": {"builtin": {"public_per_task": 4}},
            "evaluation": {"exact_match": False},
        },
        _offsite,
    ),
    # FedKSeed: no weights cross the wire, each client process rebuilds the global adapter from the steps it is
    # sent and checks it against the server's digest (a deployed process holds its own copy between rounds)
    "fedkseed": (
        {
            "paradigm": {"name": "fedkseed", "candidates": 64},
            "training": {"gradient": "zeroth_order", "lr": 1e-2, "local_steps": 4},
            "evaluation": {"exact_match": False},
        },
        _fedkseed,
    ),
    # personalised FL (FedRep): the last block's adapter stays with each client (client state: on a deployed
    # client's own disk), the first local step trains it alone; both models evaluated on each held-out share
    "personalised": (
        {
            "paradigm": {"name": "personalised", "method": "fedrep", "personal_steps": 1},
            "partition": {"holdout_fraction": 0.25},
            "evaluation": {"per_client": True, "exact_match": False},
        },
        _personalised,
    ),
    # federated DPO: pair batches, the reference taken from the round's global model in each process; a deployed
    # client reads its pairs from its own file; the held-out pairs scored the same everywhere
    "dpo": (
        {"paradigm": {"name": "dpo", "beta": 0.5}, "data": {"dataset": "builtin:preferences"}},
        _dpo,
    ),
    # a paradigm defined only in tests (tests/paradigms/toy): each process imports it by its import path
    "toy": (
        {"paradigm": {"name": "tests.paradigms.toy:PARADIGM", "scale": 2.0}, "training": None},
        None,
    ),
}
# in_process serves clients in two forked lanes; "serial" (first case only) one by one in this process:
# Ray's workers and Flower's clients also serve one 1-thread client at a time, so every case compares lanes
# with serial service
RUNTIMES = {
    "in_process": ["runtime.name=in_process", "runtime.lanes=2"],
    "serial": ["runtime.name=in_process", "runtime.lanes=1", "runtime.torch_threads=1"],
    "ray": ["runtime.name=ray"],
}


@pytest.fixture(scope="module")
def shared_ray():
    """One local Ray instance for the module's runs (each run's pool starts its own workers on it); its workers
    import what the config names from the repository, as a deployment's processes do."""
    import os

    import ray

    from tests.helpers.deployment import REPO

    env = {"PYTHONPATH": str(REPO), **{k: os.environ[k] for k in ("FEDTUNE_CACHE",) if k in os.environ}}
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", runtime_env={"env_vars": env})
    yield
    ray.shutdown()


def _same_runs(runs: dict[str, Path]) -> None:
    """Every run's last checkpoint (params, algorithm state) to the bit, and its rounds' shared measures."""
    reference, expected = _last_checkpoint(runs["in_process"]), _history(runs["in_process"])
    for name, run in runs.items():
        assert _last_checkpoint(run) == reference, name
        assert [{k: r.get(k) for k in SAME} for r in _history(run)] == [{k: r.get(k) for k in SAME} for r in expected]


def _simulated(fed: Federation, *names: str) -> dict[str, Path]:
    from fedtune.config import load_config
    from fedtune.experiment import run_experiment

    return {n: run_experiment(load_config(fed.config, [*RUNTIMES[n], f"output.name={n}"])).run_dir for n in names}


# the README's test command has its minutes counted: split has one fast case; offsite, personalised and dpo
# (parameter sharing's round, which the first case runs) their deployed ones
SIMULATED_SLOW = {"split_per_client", "offsite", "personalised", "dpo"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SIMULATED_SLOW else c for c in CASES])
def test_in_process_lanes_serial_service_and_ray_give_the_same_run(tmp_path, shared_ray, case):
    fed = Federation(tmp_path, CASES[case][0])  # only its config: nothing is deployed here
    serial = ("serial",) if case == next(iter(CASES)) else ()
    _same_runs(_simulated(fed, "in_process", *serial, "ray"))


@pytest.mark.slow  # a Flower deployment of real processes: about 40-70 s a case on 2 cores
@pytest.mark.parametrize("case", list(CASES))
def test_a_flower_deployment_gives_the_same_run_as_in_process(tmp_path, case):
    settings, own_checks = CASES[case]
    fed = Federation(tmp_path, settings)
    try:
        fed.server()
        for cid in range(3):
            fed.client(cid, None, None, "--threads", "1")  # 1 thread there, 2 in process: sums still agree
        assert fed.wait_exit("server", 300) == 0, fed.output("server")
    finally:
        fed.close()
    opened = [c for c in range(3) if "answering over the coordinator's direct channel" in fed.output(f"client-{c}")]
    assert opened, "no client's exchanges went over the direct channel"  # the first ones go through Flower
    runs = {"flower": fed.run_dir, **_simulated(fed, "in_process")}
    _same_runs(runs)
    if own_checks is not None:
        own_checks(tmp_path, runs, fed)
