"""Client-level DP through the real CLI on the tiny model: epsilon every round as the library computes it,
a budget that stops the run, noise nobody else can replay, and bit-identical resume."""

from __future__ import annotations

import json
from pathlib import Path

import dp_accounting as dpa
import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.cli import cli, read_metrics, run_tiny

DP = [
    "privacy.client_dp=central",
    "privacy.noise_multiplier=0.9",
    "privacy.clip_norm=0.05",
    "federation.clients_per_round=2",
    "training.local_steps=1",
]


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final_adapter" / "adapter_model.safetensors")


def test_epsilon_every_round_is_what_dp_accounting_gives_for_what_the_run_logged(tmp_path):
    code, out = run_tiny(tmp_path, *DP)
    assert code == 0, out
    run_dir = tmp_path / "tiny"
    told = _summary(run_dir)["privacy"]
    assert (told["sampling"], told["neighbouring"], told["sample_rate"]) == ("poisson", "add_or_remove_one", 0.5)
    metrics = read_metrics(run_dir)
    for m in metrics[1:]:
        acc = dpa.rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.ADD_OR_REMOVE_ONE)
        one = dpa.PoissonSampledDpEvent(told["sample_rate"], dpa.GaussianDpEvent(told["noise_multiplier"]))
        acc.compose(one, m["round"])
        assert m["dp_epsilon"] == pytest.approx(acc.get_epsilon(told["delta"]), rel=1e-9)
        assert m["dp_noise_std"] == pytest.approx(0.9 * 0.05 / 2)
    assert told["epsilon"] == metrics[-1]["dp_epsilon"] and told["rounds_noised"] == 3
    text = " ".join(out.split())
    assert "client-level DP" in text and f"epsilon {metrics[-1]['dp_epsilon']:.3g}" in text


def test_a_budget_stops_the_run_before_the_round_that_would_exceed_it(tmp_path):
    from fedtune.privacy.accounting import Mechanism

    mechanism = Mechanism(0.9, "poisson", 4, 2, 1e-5)
    budget = (mechanism.epsilon(2) + mechanism.epsilon(3)) / 2  # enough for 2 rounds, not for 3
    code, out = run_tiny(tmp_path, *DP, "federation.rounds=4", f"privacy.target_epsilon={budget}")
    assert code == 0, out
    run_dir = tmp_path / "tiny"
    assert [m["round"] for m in read_metrics(run_dir)] == [0, 1, 2]
    assert (run_dir / "checkpoints" / "round_0002").is_dir()
    summary = _summary(run_dir)["privacy"]
    assert summary["rounds_allowed"] == 2 and summary["rounds_planned"] == 4 and summary["epsilon"] <= budget
    assert "is spent after round 2" in " ".join(out.split())
    assert "eval_accuracy" in read_metrics(run_dir)[-1]  # the last round run gets the final evaluation


def test_the_noise_is_secret_unless_a_seed_is_set(tmp_path):
    """Without privacy.noise_seed the noise comes from the OS: two identical runs differ; with it, they repeat."""
    runs = {}
    for name, seed in [("a", []), ("b", []), ("c", ["privacy.noise_seed=5"]), ("d", ["privacy.noise_seed=5"])]:
        code, out = run_tiny(tmp_path, *DP, "federation.rounds=1", *seed, name=name)
        assert code == 0, out
        runs[name] = _adapter(tmp_path / name)
    a, b, c, d = runs.values()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(c[k], d[k]) for k in c)


def test_a_resumed_private_run_keeps_its_secret_noise_seed(tmp_path):
    code, out = run_tiny(tmp_path, *DP, "federation.rounds=1")
    assert code == 0, out

    def noise_seed(r: int) -> int:
        state = json.loads((tmp_path / "tiny" / "checkpoints" / f"round_{r:04d}" / "state.json").read_text())
        return state["aggregator_scalars"]["combine.noise_seed"]

    code, out = run_tiny(tmp_path, *DP, "federation.rounds=2", "--resume")
    assert code == 0, out
    assert noise_seed(1) == noise_seed(2) != 0


def test_the_private_example_runs_distributed_dp_under_secure_aggregation(tmp_path):
    """examples/private.yaml as shipped, on the tiny model: epsilon every round, only sums reach the server."""
    from tests.helpers.configs import TINY_OVERRIDES

    small = [o for o in TINY_OVERRIDES if not o.startswith(("partition.", "federation.rounds"))]
    code, out = cli("run", "examples/private.yaml", *small, "federation.rounds=2", f"output.dir={tmp_path}")
    assert code == 0, out
    run_dir = tmp_path / "private"
    metrics = read_metrics(run_dir)
    told = _summary(run_dir)["privacy"]
    assert (told["noise_multiplier"], told["sample_rate"], told["population"]) == (1.0, 0.25, 16)
    for m in metrics[1:]:  # a round that sampled too few to hide anyone sums nobody (secagg_skipped)
        assert m["dp_epsilon"] > 0
        assert m["secagg_summed"] == len(m["clients"]) or m.get("secagg_skipped") == 1
    assert metrics[2]["dp_epsilon"] > metrics[1]["dp_epsilon"]


def test_dp_sgd_reports_each_clients_epsilon_as_dp_accounting_computes_it(tmp_path):
    code, out = run_tiny(
        tmp_path,
        "privacy.dp_sgd={noise_multiplier: 1.2, max_grad_norm: 0.5}",
        "training.local_steps=2",
        "federation.rounds=2",
    )
    assert code == 0, out
    metrics = read_metrics(tmp_path / "tiny")
    for m in metrics[1:]:
        for c, eps in m["dp_sgd_epsilon"].items():
            rate = 4 / 24  # batch_size / the client's 24 examples
            acc = dpa.rdp.RdpAccountant()
            acc.compose(dpa.PoissonSampledDpEvent(rate, dpa.GaussianDpEvent(1.2)), 2 * m["round"])  # steps x rounds
            assert eps == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9), c
        assert m["dp_sgd_epsilon_max"] == max(m["dp_sgd_epsilon"].values())
    assert metrics[-1]["eval_loss"] != metrics[0]["eval_loss"]  # the adapters trained
