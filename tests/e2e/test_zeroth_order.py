"""Zeroth-order local training (training.gradient=zeroth_order) in a parameter-sharing run from the CLI."""

from __future__ import annotations

import pytest

from tests.helpers.cli import cli, read_metrics, run_tiny


def test_zeroth_order_clients_train_federated_and_hold_no_training_state(tmp_path):
    zo = ("training.gradient=zeroth_order", "training.lr=1e-2", "federation.rounds=2", "evaluation.every=1")
    code, out = run_tiny(tmp_path, *zo, name="zo")
    assert code == 0, out
    code, out = run_tiny(tmp_path, "federation.rounds=2", "evaluation.every=1", name="bp")
    assert code == 0, out
    fwd = ("training.gradient=forward", "training.fwd_perturbations=2", *zo[1:])
    code, out = run_tiny(tmp_path, *fwd, name="fwd")
    assert code == 0, out
    bp_rounds = read_metrics(tmp_path / "bp")[1:]
    for name in ("zo", "fwd"):
        rounds = read_metrics(tmp_path / name)[1:]
        assert all(r["dropped"] == {} and r["train_loss"] > 0 for r in rounds)  # within the auto update bound
        assert rounds[-1]["eval_loss"] != read_metrics(tmp_path / name)[0]["eval_loss"]  # the adapter moved
        # no gradient, optimizer state or kept activations: less than a backprop client holds
        assert rounds[0]["client_peak_bytes"] < bp_rounds[0]["client_peak_bytes"]
    # each forward-gradient step runs two perturbations, each two forward passes: twice MeZO's tokens fed
    zo_fed = sum(r["train_tokens"] for r in read_metrics(tmp_path / "zo")[1:])
    fwd_fed = sum(r["train_tokens"] for r in read_metrics(tmp_path / "fwd")[1:])
    assert fwd_fed == 2 * zo_fed
    # analytic FLOPs of the forward passes run: twice as many passes, twice the FLOPs
    zo_flops = sum(r["client_flops"] for r in read_metrics(tmp_path / "zo")[1:])
    fwd_flops = sum(r["client_flops"] for r in read_metrics(tmp_path / "fwd")[1:])
    assert zo_flops > 0 and fwd_flops == pytest.approx(2 * zo_flops, rel=1e-9)


def test_zeroth_order_is_refused_where_it_cannot_apply(tmp_path):
    code, out = run_tiny(tmp_path, "training.gradient=zeroth_order", "training.optimizer=adamw")
    assert code != 0 and "training.optimizer=adamw" in out and "sgd" in out
    code, out = run_tiny(tmp_path, "training.gradient=zeroth_order", "paradigm.name=kd")
    assert code != 0 and "training without backpropagation" in out
    code, out = run_tiny(tmp_path, "training.gradient=forward", "training.proximal_mu=0.1")
    assert code != 0 and "training.gradient=forward cannot be combined with training.proximal_mu" in out
    code, out = cli("run", "examples/tiny.yaml", "training.gradient=zeroth_order", "aggregation.scaffold=true")
    assert code != 0 and "aggregation.scaffold" in out
