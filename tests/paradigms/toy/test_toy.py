"""A paradigm defined only in tests runs rounds like the package's own: in process (lanes and in turn), resumed,
on Ray (and over a Flower deployment: tests/e2e/test_runtime_parity.py), with no edit to the package."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fedtune.cli import app
from fedtune.config import load_config
from fedtune.core.errors import ConfigError
from tests.helpers.cli import read_metrics
from tests.helpers.deployment import REPO

TOY = "tests.paradigms.toy:PARADIGM"
CONFIG = {
    "paradigm": {"name": TOY, "scale": 2.0},
    "model": {"name": "tiny-llama"},
    "data": {"builtin": {"train_per_task": 6, "eval_per_task": 2}, "max_seq_len": 64},
    "partition": {"method": "iid", "num_clients": 4},
    "federation": {"rounds": 2},
    "evaluation": {"exact_match": False},
    "output": {"progress": False},
}
EXPECTED = 2.0 * 24 / 4  # scale x the examples each of 4 clients holds (24 split evenly)


def _run(tmp_path: Path, *overrides: str, name: str = "toy") -> list[dict]:
    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    result = CliRunner().invoke(app, ["run", str(config), f"output.dir={tmp_path}", f"output.name={name}", *overrides])
    assert result.exit_code == 0, result.output
    return read_metrics(tmp_path / name)


@pytest.mark.parametrize("lanes", [1, 2])
def test_the_toy_registers_by_its_import_path_and_runs_rounds_in_process(tmp_path, lanes):
    rows = _run(tmp_path, f"runtime.lanes={lanes}")
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert [r["toy_mean"] for r in rows[1:]] == [EXPECTED, EXPECTED] and rows[-1]["toy_eval"] == EXPECTED
    assert all(r["clients"] == [0, 1, 2, 3] and r["bytes_up"] > 0 for r in rows[1:])
    summary = json.loads((tmp_path / "toy" / "summary.json").read_text())
    assert summary["paradigm"] == TOY and summary["toy_scale"] == 2.0 and summary["final_adapter"] is None


def test_the_toy_resumes_from_its_checkpoint(tmp_path):
    _run(tmp_path, "federation.rounds=1")
    config = tmp_path / "toy.yaml"
    result = CliRunner().invoke(app, ["run", str(config), f"output.dir={tmp_path}", "output.name=toy", "--resume"])
    assert result.exit_code == 0, result.output
    rows = read_metrics(tmp_path / "toy")
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[-1]["toy_mean"] == EXPECTED


@pytest.mark.slow  # about 18 s of Ray start-up; the runtime parity test runs the toy on Ray in the default set
def test_the_toy_runs_on_ray(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the workers import the toy from there
    rows = _run(tmp_path, "runtime.name=ray", "runtime.ray.num_workers=2")
    assert [r["toy_mean"] for r in rows[1:]] == [EXPECTED, EXPECTED]


def test_its_settings_and_what_it_does_not_read_or_support_are_config_errors():
    base = ["model.name=tiny-llama", f"paradigm.name={TOY}"]
    assert load_config(None, [*base, "paradigm.scale=3"]).paradigm.scale == 3.0
    with pytest.raises(ConfigError, match="paradigm.scale"):
        load_config(None, [*base, "paradigm.scale=-1"])
    with pytest.raises(ConfigError, match="paradigm toy does not read training.lr"):
        load_config(None, [*base, "training.lr=0.1"])
    with pytest.raises(ConfigError, match=r"paradigm toy does not support client-level DP"):
        load_config(None, [*base, "privacy.client_dp=central", "privacy.noise_multiplier=1"])
    with pytest.raises(ConfigError, match="cannot import tests.paradigms.nothing"):
        load_config(None, ["paradigm.name=tests.paradigms.nothing:PARADIGM"])
    with pytest.raises(ConfigError, match="has no attribute 'MISSING'"):
        load_config(None, ["paradigm.name=tests.paradigms.toy:MISSING"])
