"""fedtune tune: the search space, trials as runs, rounds as the budget, the report, a killed search resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedtune.config import load_config
from fedtune.core.errors import ConfigError
from tests.helpers.cli import cli, read_metrics
from tests.helpers.configs import TINY_OVERRIDES

pytest.importorskip("optuna")

SPACE = [
    "tune.trials=5",
    "tune.space={training.lr: {low: 1.0e-4, high: 3.0e-2, log: true}, adapter.r: {choices: [2, 4]}, "
    "training.local_steps: {low: 1, high: 3}}",
    "federation.rounds=4",
    "evaluation.every=1",
    "evaluation.exact_match=false",
    "output.progress=false",
]


def _args(tmp_path: Path, *extra: str) -> list[str]:
    return ["examples/tiny.yaml", *TINY_OVERRIDES, *SPACE, f"output.dir={tmp_path}", "output.name=search", *extra]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["tune.space={federation.rounds: {choices: [2, 3]}}"], "owns seeds"),
        (["tune.space={training.lr: {low: 0.1, high: 0.01}}"], "must be below"),
        (["tune.space={training.lr: {low: 0.0, high: 0.01, log: true}}"], "log=true needs low > 0"),
        (["tune.space={adapter.r: {choices: [4], low: 1, high: 2}}"], "either choices"),
        (["tune.space={adapter.r: {choices: []}}"], "one or more distinct"),
    ],
)
def test_a_space_that_cannot_be_searched_is_refused_naming_the_key(extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config("examples/tiny.yaml", [*TINY_OVERRIDES, *extra])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["evaluation.every=2"], "evaluation.every: 1"),
        (["tune.min_rounds=4"], "no rung below"),
        (["tune.metric=client_eval_loss_mean"], "evaluation.per_client"),
        (["compare.variants={a: {}}"], "one of compare or tune"),
    ],
)
def test_a_search_that_cannot_measure_what_it_asks_is_refused(extra, message):
    from fedtune.tune.runner import check

    with pytest.raises(ConfigError, match=message):
        check(load_config("examples/tiny.yaml", [*TINY_OVERRIDES, *SPACE, *extra]))


def test_fedtune_run_refuses_a_config_that_searches(tmp_path):
    code, out = cli("run", *_args(tmp_path))
    assert code != 0 and "fedtune tune" in out


def test_the_space_maps_to_optunas_distributions_and_a_trial_to_a_config():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from fedtune.tune.space import distributions, trial_config

    base = load_config("examples/tiny.yaml", [*TINY_OVERRIDES, *SPACE])
    d = distributions(base.tune.space)
    assert d["training.lr"] == FloatDistribution(1e-4, 3e-2, log=True)
    assert d["adapter.r"] == CategoricalDistribution([2, 4])
    assert d["training.local_steps"] == IntDistribution(1, 3)
    cfg = trial_config(base, {"training.lr": 0.005, "adapter.r": 4}, Path("/nowhere/trials/trial-007"))
    assert (cfg.training.lr, cfg.adapter.r, cfg.output.name, cfg.tune.on()) == (0.005, 4, "trial-007", False)
    assert cfg.data.split_seed == base.split_seed() and cfg.federation.rounds == base.federation.rounds
    with pytest.raises(ConfigError, match="adapter.r"):
        trial_config(base, {"adapter.r": 0}, Path("/nowhere/trials/trial-008"))


def _search(tmp_path: Path, *extra: str) -> dict:
    code, out = cli("tune", *_args(tmp_path, *extra))
    assert code == 0, out
    return json.loads((tmp_path / "search" / "tune.json").read_text())


def test_trials_are_runs_the_scheduler_stops_early_and_the_best_is_the_lowest(tmp_path):
    s = _search(tmp_path, "tune.scheduler=successive_halving", "tune.reduction_factor=2", "tune.seeds=1")
    trials = s["trials"]
    assert len(trials) == 5 and {t["state"] for t in trials} <= {"complete", "pruned"}
    assert any(t["state"] == "pruned" for t in trials)  # rounds are the budget
    assert all(t["rounds"] < 4 for t in trials if t["state"] == "pruned")  # a trial that ran them all completes
    assert s["rounds_spent"] == sum(t["rounds"] for t in trials) < s["rounds_without_stopping"] == 20
    for t in trials:  # every reported value is its run's eval loss in that round, from a normal run directory
        rows = read_metrics(tmp_path / "search" / t["run_dir"])
        assert {str(r["round"]): r["eval_loss"] for r in rows if r["round"] > 0} == t["curve"]
    complete = [t for t in trials if t["state"] == "complete"]
    assert s["best"]["number"] == min(complete, key=lambda t: t["value"])["number"]
    assert s["best"]["rounds"] == 4
    table = (tmp_path / "search" / "tune.md").read_text()
    assert "(best)" in table and "training.lr" in table
    # tune.seeds: the base config beside the best setting, as a comparison
    final = json.loads((tmp_path / "search" / "final" / "comparison.json").read_text())
    assert set(final["variants"]) == {"base", "best"}
    assert final["variants"]["best"]["overrides"] == s["best"]["params"]


def test_a_setting_the_config_refuses_costs_its_trial_not_the_search(tmp_path):
    s = _search(tmp_path, "tune.trials=3", "tune.space={adapter.r: {choices: [0, 2]}}", "tune.scheduler=none")
    states = {t["params"]["adapter.r"]: t["state"] for t in s["trials"]}  # the seed draws both values
    assert states == {0: "fail", 2: "complete"}
    assert all("adapter.r" in t["error"] for t in s["trials"] if t["state"] == "fail")


def test_a_second_search_in_the_same_directory_must_be_the_same_search(tmp_path):
    _search(tmp_path, "tune.trials=1", "tune.scheduler=none")
    code, out = cli("tune", *_args(tmp_path, "tune.trials=1", "tune.scheduler=none", "training.batch_size=2"))
    assert code != 0 and "another config" in out


@pytest.mark.slow  # about a minute: a search killed mid-trial in a subprocess, resumed, and one run straight
def test_a_killed_search_resumes_to_the_same_trials(tmp_path):
    straight = _search(tmp_path / "a", "tune.scheduler=hyperband")
    args = _args(tmp_path / "b", "tune.scheduler=hyperband")
    env = {**os.environ, "PYTHONPATH": str(Path.cwd() / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "fedtune.cli", "tune", *args], env=env, stdout=subprocess.DEVNULL)
    mark = tmp_path / "b" / "search" / "trials" / "trial-002" / "checkpoints" / "round_0001"
    deadline = time.time() + 300
    while not mark.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (
        not (tmp_path / "b" / "search" / "tune.json").exists()
        or len(json.loads((tmp_path / "b" / "search" / "tune.json").read_text())["trials"]) < 5
    )
    code, out = cli("tune", *args)
    assert code == 0, out
    resumed = json.loads((tmp_path / "b" / "search" / "tune.json").read_text())

    def same(s: dict) -> list:
        return [(t["params"], t["state"], t["rounds"], t["curve"]) for t in s["trials"]]

    assert same(resumed) == same(straight) and resumed["best"]["number"] == straight["best"]["number"]


@pytest.mark.parametrize(("metric", "best"), [("eval_loss", 1), ("eval_reward_accuracy", 2)])
def test_an_accuracy_is_maximised_and_a_loss_minimised(metric, best):
    import optuna
    from optuna.distributions import FloatDistribution

    from fedtune.tune.report import markdown, summary
    from fedtune.tune.runner import _best

    base = load_config("examples/tiny.yaml", [*TINY_OVERRIDES, *SPACE, f"tune.metric={metric}"])
    study = optuna.create_study(direction=base.tune.direction())
    for lr, value in ((1e-3, 0.6), (2e-3, 0.2), (3e-3, 0.9)):  # trials 0, 1, 2
        study.add_trial(
            optuna.trial.create_trial(
                params={"training.lr": lr},
                distributions={"training.lr": FloatDistribution(1e-4, 3e-2, log=True)},
                value=value,
                intermediate_values={1: value},
            )
        )
    assert _best(study).number == best
    s = summary(study, base)
    assert s["best"]["number"] == best and s["direction"] == base.tune.direction()
    rows = [line for line in markdown(s, "cmd").splitlines() if line.startswith("| ") and "(best)" in line]
    table = [line for line in markdown(s, "cmd").splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert rows and table[0] == rows[0]  # the best trial heads the table
