"""One config, three runtimes: in_process, a Ray pool, and a Flower deployment of real processes.

Same seed, 3 clients, 2 rounds on the tiny model: the final adapters must be bit-identical, and
so must every round's losses and byte counts. Holds on CPU because every client's computation
is a pure function of (config, seed, round, client id) and the server sums in client-id order.
"""

from __future__ import annotations

import json

import pytest

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


def test_in_process_ray_and_flower_give_the_same_adapter(tmp_path):
    from fedtune.config import load_config
    from fedtune.experiment import run_experiment

    fed = Federation(tmp_path, PARITY)
    try:
        fed.server()
        for cid in range(3):
            fed.client(cid, None, None, "--threads", "1")  # 1 thread here, 2 in-process: sums still agree
        assert fed.wait_exit("server", 240) == 0, fed.output("server")
    finally:
        fed.close()
    assert "refused" not in fed.output("server")
    runs = {"flower": fed.run_dir}
    for name in ("in_process", "ray"):
        cfg = load_config(fed.config, [f"runtime.name={name}", f"output.name={name}"])
        runs[name] = run_experiment(cfg).run_dir

    reference = (runs["in_process"] / "final_adapter" / "adapter_model.safetensors").read_bytes()
    for name in ("ray", "flower"):
        assert (runs[name] / "final_adapter" / "adapter_model.safetensors").read_bytes() == reference, name
    expected = [{k: r.get(k) for k in SAME} for r in _history(runs["in_process"])]
    for name in ("ray", "flower"):
        history = _history(runs[name])
        assert [{k: r.get(k) for k in SAME} for r in history] == expected, name
        # replies carry their measured training time as text in the header: a few bytes of jitter
        for got, ref in zip(history[1:], _history(runs["in_process"])[1:], strict=True):
            assert abs(got["bytes_up"] - ref["bytes_up"]) <= 3 * 8, name
    # each deployed client kept its own error-feedback residual on its own disk
    assert all(any((tmp_path / "runs" / f"fed.client-client-{c}").rglob("round-*.safetensors")) for c in range(3))
