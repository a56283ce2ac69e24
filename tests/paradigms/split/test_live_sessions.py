"""A split client's round kept live in memory between exchanges gives the round loaded from its state every time.

Kept live, a client backpropagates through the graph of its front's first forward and steps its optimizer
in memory; loaded, it runs the front again and rebuilds the optimizer from the state. Every number must
be the same to the bit, whichever sessions a process still holds (at most ``LIVE_SESSIONS``).
"""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from fedtune.config import load_config
from fedtune.experiment import run_experiment
from fedtune.paradigms.split import client as split_client
from tests.helpers.configs import TINY_OVERRIDES

BASE = [
    *TINY_OVERRIDES,
    "model.name=tiny-llama-deep",
    "paradigm.name=split",
    "partition.method=iid",
    "partition.num_clients=2",
    "federation.rounds=2",
    "training.local_steps=2",
    "training.grad_accum=2",  # fronts wait for their gradients across exchanges
    "training.lr=2e-2",
    "evaluation.every=0",
    "evaluation.at_start=false",
    "evaluation.exact_match=false",
    "runtime.lanes=1",  # one process serves every exchange: sessions are found again
    "runtime.torch_threads=1",
]
CASES = {
    "u per client": ["paradigm.shape=u", "paradigm.server_part=per_client"],
    "u shared": ["paradigm.shape=u", "paradigm.server_part=shared"],
    "vanilla": ["paradigm.shape=vanilla", "paradigm.client_front=2"],
}


def _run(tmp_path, name: str, overrides: list[str]) -> tuple[bytes, list]:
    cfg = load_config(None, [*BASE, *overrides, f"output.dir={tmp_path}", f"output.name={name}"])
    run = run_experiment(cfg).run_dir
    adapter = (run / "final_adapter" / "adapter_model.safetensors").read_bytes()
    return adapter, sorted(load_file(run / "final_adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("sessions", [split_client.LIVE_SESSIONS, 1])
@pytest.mark.parametrize("case", list(CASES))
def test_a_round_kept_live_gives_the_round_loaded_from_its_state(tmp_path, monkeypatch, case, sessions):
    loads = []
    real_load = split_client.SplitClient._load
    monkeypatch.setattr(split_client.SplitClient, "_load", lambda self, own: loads.append(1) or real_load(self, own))
    monkeypatch.setattr(split_client, "LIVE_SESSIONS", sessions)
    live, names = _run(tmp_path, "live", CASES[case])
    live_loads = len(loads)
    monkeypatch.setattr(split_client.SplitClient, "keep_live", False)
    loads.clear()
    loaded, _ = _run(tmp_path, "loaded", CASES[case])
    assert names and live == loaded
    if sessions > 1:  # the clients' rounds are live throughout: each loaded once a round
        assert live_loads == 2 * 2 < len(loads)
    elif case == "u per client":  # one session for two interleaved clients: evicted, they load their state again
        assert 2 * 2 < live_loads <= len(loads)
