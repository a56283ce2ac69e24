"""fedtune compare: variants x seeds through the real CLI on the tiny model; the table is what the runs say."""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fedtune.cli import app
from fedtune.compare.measures import run_measures
from fedtune.reporting.stats import t975

VARIANTS = {"lora": {}, "lora int8": {"compression": {"uplink": [{"name": "int8"}]}}}
BASE = {
    "model": {"name": "tiny-llama"},
    "data": {"builtin": {"train_per_task": 16, "eval_per_task": 2}, "max_seq_len": 64},
    "partition": {"method": "by_field", "field": "task", "num_clients": 2},
    "federation": {"rounds": 2, "clients_per_round": 1},
    "training": {"local_steps": 2, "batch_size": 4, "lr": 5e-3},
    "evaluation": {"max_new_tokens": 4},
    "output": {"progress": False},
    "compare": {"seeds": 2, "variants": VARIANTS, "target_loss": 50.0},
}


def _config(tmp_path: Path, **changes) -> Path:
    cfg = json.loads(json.dumps(BASE))
    cfg.update(changes)
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _compare(path: Path, tmp_path: Path, *extra: str):
    result = CliRunner().invoke(app, ["compare", str(path), f"output.dir={tmp_path / 'out'}", *extra])
    result.text = " ".join(result.output.split())  # the console wraps long lines
    return result


def _history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_two_by_two_comparison_reports_what_its_runs_measured(tmp_path):
    result = _compare(_config(tmp_path), tmp_path)
    assert result.exit_code == 0, result.output
    out = tmp_path / "out" / "cmp"
    report = json.loads((out / "comparison.json").read_text())
    assert report["seeds"] == [0, 1] and list(report["variants"]) == list(VARIANTS)
    for name, slug in [("lora", "lora"), ("lora int8", "lora_int8")]:
        runs = [out / "runs" / f"{slug}-seed{s}" for s in (0, 1)]
        histories = [_history(r) for r in runs]
        assert all((r / "summary.json").is_file() for r in runs)
        # the seeds differ in training, not in what they are evaluated on: LoRA starts as the base model,
        # so every seed's round-0 loss on the one evaluation set is the same
        assert histories[0][0]["eval_loss"] == histories[1][0]["eval_loss"]
        finals = [h[-1]["eval_loss"] for h in histories]
        assert finals[0] != finals[1]
        summary = report["variants"][name]["summary"]
        mean, half = statistics.fmean(finals), t975(1) * statistics.stdev(finals) / math.sqrt(2)
        assert summary["final_eval_loss"]["mean"] == pytest.approx(mean, rel=1e-12)
        assert summary["final_eval_loss"]["half_width"] == pytest.approx(half, rel=1e-12)
        up = statistics.fmean(sum(r["bytes_up"] for r in h if r["round"] > 0) / 2 for h in histories)
        assert summary["bytes_up_per_client"]["mean"] == pytest.approx(up, rel=1e-12)
        flops = [statistics.fmean(r["client_flops"] for r in h if r["round"] > 0) for h in histories]
        assert summary["client_flops_per_round"]["mean"] == pytest.approx(statistics.fmean(flops), rel=1e-12)
        assert summary["rounds_to_target"]["mean"] == 0  # the base model's loss is already under 50
    int8, fp32 = (report["variants"][n]["summary"]["bytes_up_per_client"]["mean"] for n in ("lora int8", "lora"))
    assert int8 < 0.4 * fp32  # the variant's override reached its runs
    md = (out / "comparison.md").read_text()
    assert "| lora int8 | 2 |" in md and "## Ranking" in md
    for stem in ("loss_vs_bytes", "loss_vs_client_flops", "loss_by_round"):
        assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({stem}.png)" in md


def test_a_killed_comparison_continues_without_repeating_finished_runs(tmp_path):
    path = _config(tmp_path, federation={"rounds": 3, "clients_per_round": 1})
    out = tmp_path / "out" / "cmp"
    env = {**os.environ, "PYTHONPATH": str(Path.cwd() / "src")}
    cmd = [sys.executable, "-m", "fedtune.cli", "compare", str(path), f"output.dir={tmp_path / 'out'}"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = out / "runs" / "lora_int8-seed0" / "checkpoints" / "round_0001"
    deadline = time.time() + 300
    while not second.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = out / "runs" / "lora-seed0"
    assert (first / "summary.json").is_file() and not (out / "runs" / "lora_int8-seed0" / "summary.json").exists()
    before = {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()}

    result = _compare(path, tmp_path)
    assert result.exit_code == 0, result.output
    assert "[1/4] lora seed 0: finished before, kept" in result.text
    assert "[2/4] lora int8 seed 0: continuing" in result.text  # seed by seed: every variant of seed 0 first
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()} == before  # not run again
    report = json.loads((out / "comparison.json").read_text())
    assert all(v["seeds_done"] == 2 for v in report["variants"].values())

    again = _compare(path, tmp_path)  # everything finished: nothing runs, the report is rewritten
    assert again.exit_code == 0 and again.text.count("finished before, kept") == 4


def test_a_finished_run_made_with_another_config_is_not_reused(tmp_path):
    path = _config(tmp_path, compare={"seeds": 1, "variants": {"lora": {}}})
    assert _compare(path, tmp_path).exit_code == 0
    result = _compare(path, tmp_path, "training.lr=1e-3")
    assert result.exit_code == 2
    assert "different config" in result.text and "training.lr" in result.text


@pytest.mark.parametrize(
    ("variants", "message"),
    [
        ({"bad": {"training.lr": -1}}, "compare.variants['bad']"),
        ({"bad": {"trainng.lr": 1e-3}}, "unknown key 'trainng'"),
        ({"bad": {"seed": 3}}, "a comparison owns seeds"),
        ({"a b": {}, "a_b": {}}, "same run directory name"),
        ({}, "nothing to compare"),
    ],
)
def test_bad_variants_are_config_errors_that_name_them(tmp_path, variants, message):
    result = _compare(_config(tmp_path, compare={"seeds": 2, "variants": variants}), tmp_path)
    assert result.exit_code == 2 and message in result.text, result.output
    assert not (tmp_path / "out" / "cmp" / "runs").exists()


def test_fedtune_run_refuses_a_comparison(tmp_path):
    result = CliRunner().invoke(app, ["run", str(_config(tmp_path)), f"output.dir={tmp_path}"])
    assert result.exit_code == 2 and "fedtune compare" in " ".join(result.output.split())


def test_measures_per_sampled_client_and_round():
    history = [
        {"round": 0, "eval_loss": 3.0},
        {"round": 1, "clients": [0, 1], "bytes_up": 40, "bytes_down": 20, "local_train_s": 4.0, "train_s": 5.0,
         "clients_s": 2.5, "client_flops": 10.0, "client_peak_bytes": 7},  # two clients side by side
        {"round": 2, "clients": [1], "bytes_up": 10, "bytes_down": 10, "local_train_s": 1.0, "train_s": 1.5,
         "client_flops": 4.0, "client_peak_bytes": 9, "eval_loss": 1.5, "eval_accuracy": 0.25},
    ]  # fmt: skip
    got = run_measures(history, num_clients=2, target_loss=2.0)
    m = got["measures"]
    assert m["final_eval_loss"] == 1.5 and m["final_accuracy"] == 0.25 and m["rounds_to_target"] == 2
    assert m["bytes_up_per_client"] == 25 and m["bytes_down_per_client"] == 15
    assert m["client_s_per_round"] == (2.0 + 1.0) / 2 and m["client_flops_per_round"] == (5.0 + 4.0) / 2
    # outside the clients' hands: train_s - clients_s (a record from before clients_s: - local_train_s)
    assert m["client_peak_bytes"] == 9 and m["server_s_per_round"] == (2.5 + 0.5) / 2
    assert got["curves"] == {"round": [0, 2], "eval_loss": [3.0, 1.5], "bytes_per_client": [0.0, 40.0],
                             "client_flops": [0.0, 7.0]}  # fmt: skip
    assert run_measures(history, 2, 1.0)["measures"]["rounds_to_target"] is None
    assert m["epsilon"] is None  # no privacy: no epsilon


def test_epsilon_is_the_accountants_figure_after_the_last_round():
    history = [
        {"round": 0, "eval_loss": 3.0},
        {"round": 1, "clients": [0], "bytes_up": 1, "bytes_down": 1, "local_train_s": 1.0, "train_s": 1.0,
         "dp_epsilon": 0.8},
        {"round": 2, "clients": [], "bytes_up": 0, "bytes_down": 0, "local_train_s": 0.0, "train_s": 0.1,
         "dp_epsilon": 1.1, "eval_loss": 2.5},
    ]  # fmt: skip
    assert run_measures(history, num_clients=1, target_loss=None)["measures"]["epsilon"] == 1.1


def test_a_failed_run_is_reported_and_does_not_stop_the_others(tmp_path):
    variants = {"no data": {"data.dataset": str(tmp_path / "missing.jsonl")}, "lora": {}}
    result = _compare(_config(tmp_path, compare={"seeds": 1, "variants": variants}), tmp_path)
    assert result.exit_code == 2 and "1 of 2 runs failed (no_data-seed0)" in result.text, result.output
    assert "missing.jsonl" in result.text  # the run's own error, as it said it
    out = tmp_path / "out" / "cmp"
    report = json.loads((out / "comparison.json").read_text())
    assert list(report["failed"]) == ["no_data-seed0"] and report["variants"]["lora"]["seeds_done"] == 1
    assert "## Failed runs" in (out / "comparison.md").read_text()


def test_the_paradigm_example_plans_five_valid_variants_of_three_seeds(tmp_path):
    from fedtune.compare.plan import plan
    from fedtune.config import load_config

    planned = plan(load_config("examples/compare_paradigms.yaml"), tmp_path)
    assert len(planned.runs) == 15 and planned.seeds == [0, 1, 2]
    kinds = {
        r.variant: (r.config.paradigm.name, getattr(r.config.paradigm, "downlink", None), r.config.adapter.method)
        for r in planned.runs
    }
    assert kinds["kd logits"] == ("kd", "logits", "lora") and kinds["kd adapter"] == ("kd", "adapter", "lora")
    assert kinds["ia3 + int4"][2] == "ia3" and kinds["split u 1+1"][0] == "split"
    assert {r.config.data.split_seed for r in planned.runs} == {0}  # one evaluation set for every seed


def test_a_variant_can_turn_privacy_on_over_a_base_without_it(tmp_path):
    """A variant meets the defaults its own config would: privacy resolves weighting and LoRA mode itself."""
    from fedtune.compare.plan import plan
    from fedtune.config import load_config

    planned = plan(load_config("examples/compare_privacy.yaml"), tmp_path)
    assert len(planned.runs) == 15
    by = {r.variant: r.config for r in planned.runs if r.seed == 0}
    assert by["no DP"].privacy.client_dp == "off" and by["no DP"].aggregation.weighting == "examples"
    for name, z in {"clip only": 0.0, "z 0.3": 0.3, "z 1": 1.0, "z 3": 3.0}.items():
        c = by[name]
        assert (c.privacy.client_dp, c.privacy.clip_norm, c.privacy.noise_multiplier) == ("central", 0.3, z)
        assert c.aggregation.weighting == "uniform" and c.aggregation.lora == "ffa"


def test_benchmark_scores_become_measures_columns_and_rankings():
    from fedtune.compare.report import _columns, _ranked, markdown
    from fedtune.reporting.stats import interval

    def history(acc):
        return [
            {"round": 0, "eval_loss": 3.0, "mmlu_accuracy": 0.2},
            {"round": 1, "clients": [0], "bytes_up": 1, "bytes_down": 1, "local_train_s": 1.0, "train_s": 1.0,
             "eval_loss": 2.0, "mmlu_accuracy": acc, "mmlu_accuracy_by_group": {"a": acc}, "mmlu_s": 3.0},
        ]  # fmt: skip

    m = run_measures(history(0.5), num_clients=1, target_loss=None)["measures"]
    assert m["final_mmlu_accuracy"] == 0.5 and not any("by_group" in k or (k.endswith("_s") and "mmlu" in k) for k in m)
    summaries = {
        name: {"final_eval_loss": interval([2.0, 2.1]).as_dict(), "final_mmlu_accuracy": interval(accs).as_dict()}
        for name, accs in (("low", [0.10, 0.11]), ("high", [0.80, 0.81]))
    }
    variants = {n: {"summary": s, "seeds_done": 2} for n, s in summaries.items()}
    assert _columns(variants)["final_mmlu_accuracy"][0] == "mmlu accuracy %"
    assert _ranked(variants)["final_mmlu_accuracy"] is False  # higher is better
    from fedtune.reporting.stats import tiers

    order = tiers({n: interval(a) for n, a in (("low", [0.10, 0.11]), ("high", [0.80, 0.81]))}, False)
    text = markdown({"command": "c", "seeds": [0, 1], "target_loss": None, "variants": variants, "failed": {},
                     "ranking": {"final_mmlu_accuracy": order}}, [])  # fmt: skip
    assert "mmlu accuracy %" in text and "mmlu accuracy % (higher is better), in tiers" in text
