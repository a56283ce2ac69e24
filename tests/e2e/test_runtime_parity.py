"""One config, three runtimes: in_process (in parallel lanes and serially), a Ray pool, and a Flower
deployment of real processes.

Same seed, 3 clients, 2 rounds on the tiny model: the final adapters must be bit-identical, and
so must every round's losses and byte counts. Holds on CPU because every client's computation
is a pure function of (config, seed, round, client id) and the server sums in client-id order.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.e2e.federation import Federation

pytest.importorskip("ray")
pytest.importorskip("flwr")

# int8 + error feedback up (client state), bf16 down (a dtype numpy would lose)
PARITY = {
    "compression": {"uplink": ["int8"], "error_feedback": True, "downlink": ["bf16"]},
    "federation": {"rounds": 2},
}
SAME = ("train_loss", "eval_loss", "bytes_down", "clients")


def _history(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _on_every_runtime(
    tmp_path, settings: dict, deadline_s: float = 240, serial: bool = False
) -> tuple[dict, Federation]:
    """One config run by a Flower deployment of 3 clients (1 torch thread each), in process and on Ray:
    run directories by runtime name, and the federation (for its output)."""
    from fedtune.config import load_config
    from fedtune.experiment import run_experiment

    fed = Federation(tmp_path, settings)
    try:
        fed.server()
        for cid in range(3):
            fed.client(cid, None, None, "--threads", "1")  # 1 thread here, 2 in-process: sums still agree
        assert fed.wait_exit("server", deadline_s) == 0, fed.output("server")
    finally:
        fed.close()
    runs = {"flower": fed.run_dir}
    for name, runtime in RUNTIMES.items():
        if name == "serial" and not serial:
            continue
        cfg = load_config(fed.config, [*runtime, f"output.name={name}"])
        runs[name] = run_experiment(cfg).run_dir
    return runs, fed


# the reference serves clients in two forked lanes; "serial" serves them one by one in this process (run
# in the first case only: Ray's workers and Flower's clients are also one 1-thread client at a time, so
# every case already compares lanes with serial service)
RUNTIMES = {
    "in_process": ["runtime.name=in_process", "runtime.lanes=2"],
    "serial": ["runtime.name=in_process", "runtime.lanes=1", "runtime.torch_threads=1"],
    "ray": ["runtime.name=ray"],
}
OTHERS = ("ray", "flower")


def test_in_process_ray_and_flower_give_the_same_adapter(tmp_path):
    runs, fed = _on_every_runtime(tmp_path, PARITY, serial=True)
    assert "refused" not in fed.output("server")

    reference = (runs["in_process"] / "final_adapter" / "adapter_model.safetensors").read_bytes()
    for name in ("serial", *OTHERS):
        assert (runs[name] / "final_adapter" / "adapter_model.safetensors").read_bytes() == reference, name
    expected = [{k: r.get(k) for k in SAME} for r in _history(runs["in_process"])]
    for name in ("serial", *OTHERS):
        history = _history(runs[name])
        assert [{k: r.get(k) for k in SAME} for r in history] == expected, name
        # replies carry their measured training time as text in the header: a few bytes of jitter
        for got, ref in zip(history[1:], _history(runs["in_process"])[1:], strict=True):
            assert abs(got["bytes_up"] - ref["bytes_up"]) <= 3 * 8, name
    # each deployed client kept its own error-feedback residual on its own disk
    assert all(any((tmp_path / "runs" / f"fed.client-client-{c}").rglob("round-*.safetensors")) for c in range(3))


# KD with logits on the downlink: no adapter crosses the wire, each client keeps its own (client state)
KD_PARITY = {
    "paradigm": "kd",
    "kd": {"top_k": 4, "public_slice": 6, "distill_steps": 2, "distill_batch_size": 3},
    "data": {"builtin": {"public_per_task": 8}},
    "compression": {"uplink": ["fp16"], "downlink": ["bf16"]},
    "evaluation": {"exact_match": False},
    "federation": {"rounds": 2},
}


def test_kd_gives_the_same_consensus_and_client_adapters_on_every_runtime(tmp_path):
    from safetensors.torch import load_file

    from fedtune.paradigms.kd.server import KDState
    from fedtune.server.checkpoint import load_latest
    from fedtune.types import unflatten_state

    runs, _ = _on_every_runtime(tmp_path, KD_PARITY)
    template = KDState(torch.zeros(0), torch.zeros(0, 4), torch.zeros(0, 4))
    states = {name: load_latest(run, template) for name, run in runs.items()}
    ref = states["in_process"]
    for name in OTHERS:
        assert all(torch.equal(a, b) for a, b in zip(states[name].algorithm[:3], ref.algorithm[:3], strict=True)), name
        history = [{k: r.get(k) for k in (*SAME, "eval_loss")} for r in _history(runs[name])]
        assert history == [{k: r.get(k) for k in (*SAME, "eval_loss")} for r in _history(runs["in_process"])], name
    # every deployed client's own adapter, on its own disk, is the one the simulation kept for it
    for c in range(3):
        stored = sorted((tmp_path / "runs" / f"fed.client-client-{c}" / f"client-{c}").glob("round-*.safetensors"))
        own = unflatten_state(load_file(stored[-1]))["kd"]
        assert own.keys() == ref.clients[c]["kd"].keys()
        assert all(torch.equal(own[k], ref.clients[c]["kd"][k]) for k in own), c


# split learning: five exchanges per client per round (U shape, 2 micro-batches), the client's round state
# travelling with each (Ray) or kept by the deployed client; per-client server parts, so that the clients'
# exchanges go in lockstep (the shared part's client-after-client turns are the same code, one client a time)
# the default server part (shared: the sampled clients take turns), 2 micro-batches in one optimizer
# step (the pipelined exchanges: activations ride with a gradient), bf16 activations
SPLIT_PARITY = {
    "paradigm": "split",
    "model": {"name": "tiny-llama-deep"},
    "split": {"shape": "u", "server_part": "shared", "activation_codecs": [{"name": "bf16"}]},
    "training": {"local_steps": 1, "grad_accum": 2},
    "evaluation": {"exact_match": False},
    "federation": {"rounds": 2, "clients_per_round": 2},
}


def test_split_gives_the_same_adapter_on_every_runtime(tmp_path):
    runs, _ = _on_every_runtime(tmp_path, SPLIT_PARITY, deadline_s=300)
    reference = (runs["in_process"] / "final_adapter" / "adapter_model.safetensors").read_bytes()
    expected = [{k: r.get(k) for k in SAME} for r in _history(runs["in_process"])]
    for name in OTHERS:
        assert (runs[name] / "final_adapter" / "adapter_model.safetensors").read_bytes() == reference, name
        assert [{k: r.get(k) for k in SAME} for r in _history(runs[name])] == expected, name


# distributed DP under secure aggregation: four exchanges a round, each deployed client keeping its round's
# secrets in its own state store between them
SECURE_PARITY = {
    "privacy": {
        "client_dp": "distributed",
        "noise_multiplier": 0.8,
        "clip_norm": 0.05,
        "secure_aggregation": {"threshold": 0.6},
        "noise_seed": 3,
    },
    "federation": {"rounds": 2},
}


def test_secure_aggregation_gives_the_same_adapter_on_every_runtime(tmp_path):
    runs, _ = _on_every_runtime(tmp_path, SECURE_PARITY)
    reference = (runs["in_process"] / "final_adapter" / "adapter_model.safetensors").read_bytes()
    expected = [{k: r.get(k) for k in (*SAME, "secagg_summed", "dp_epsilon")} for r in _history(runs["in_process"])]
    assert all(r.get("secagg_summed") == 3 for r in expected[1:])
    for name in OTHERS:
        assert (runs[name] / "final_adapter" / "adapter_model.safetensors").read_bytes() == reference, name
        history = [{k: r.get(k) for k in (*SAME, "secagg_summed", "dp_epsilon")} for r in _history(runs[name])]
        assert history == expected, name
