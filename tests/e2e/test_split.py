"""Split-FedLLM end to end on the tiny model, through the real CLI: both shapes, both server modes, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedtune.cli import app
from fedtune.config import load_config
from fedtune.core.errors import ConfigError
from fedtune.reporting.metrics import TIMED
from tests.helpers.configs import TINY_OVERRIDES
from tests.helpers.kill import assert_resume_matches

SPLIT = [*TINY_OVERRIDES, "model.name=tiny-llama-deep", "paradigm=split", "evaluation.exact_match=false"]


def _cli(tmp_path: Path, name: str, *extra: str):
    args = ["run", "examples/tiny.yaml", *SPLIT, f"output.dir={tmp_path}", f"output.name={name}", *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / name
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run_dir, metrics


@pytest.mark.parametrize(
    "cut",
    [
        ["paradigm.shape=u"],
        ["paradigm.shape=u", "paradigm.server_part=per_client", "paradigm.activation_codecs=[{name: int8}]"],
        ["paradigm.shape=vanilla", "paradigm.client_front=2", "paradigm.activation_codecs=[{name: bf16}]"],
    ],
    ids=["u", "u-per-client-int8", "vanilla-bf16"],
)
def test_split_runs_learns_and_reports_what_crossed(tmp_path, cut):
    run_dir, metrics = _cli(tmp_path, "run", *cut, "training.lr=1e-2")
    assert [m["round"] for m in metrics] == [0, 1, 2, 3]
    assert metrics[-1]["eval_loss"] < metrics[0]["eval_loss"]
    for m in metrics[1:]:
        assert m["local_micro_batches"] == 4 * 2 and m["bytes_up"] > 0 and m["bytes_down"] > 0
        assert (m["activation_codec_error"] > 0) == ("activation_codecs" in " ".join(cut))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["paradigm"] == "split" and summary["split"]["server_blocks"]
    log = (run_dir / "run.log").read_text()
    assert ("the server sees" in log or "sends its next-token labels" in log) == ("vanilla" in " ".join(cut))
    assert (run_dir / "final_adapter" / "adapter_model.safetensors").exists()


def test_settings_split_learning_does_not_support_are_refused():
    for extra, why in [
        (["training.proximal_mu=0.1"], "paradigm split does not read training.proximal_mu"),
        (["aggregation.scaffold=true"], "paradigm split does not read aggregation.scaffold"),
        (["evaluation.per_client=true", "partition.holdout_fraction=0.2"], "does not support evaluation on each"),
        (["training.gradient_checkpointing=true"], "does not support gradient checkpointing"),
        (["adapter.method=prompt_tuning"], "outside the decoder blocks"),
        (["paradigm.activation_codecs=[{name: topk, fraction: 0.1}]"], "value codecs"),
        (["paradigm.shape=vanilla", "paradigm.client_back=1"], "applies to shape u"),
    ]:
        with pytest.raises(ConfigError, match=why):
            load_config("examples/tiny.yaml", [*SPLIT, *extra])
    with pytest.raises(ConfigError, match="the split section applies to paradigm split"):
        load_config("examples/tiny.yaml", [*TINY_OVERRIDES, "split.client_front=2"])  # the earlier form
    with pytest.raises(ConfigError, match="unknown key 'paradigm.client_front'"):
        load_config("examples/tiny.yaml", [*TINY_OVERRIDES, "paradigm.client_front=2"])


def test_cut_points_outside_the_model_are_refused_before_any_round(tmp_path):
    result = CliRunner().invoke(
        app, ["run", "examples/tiny.yaml", *SPLIT, "paradigm.client_front=3", f"output.dir={tmp_path}"]
    )
    assert result.exit_code != 0 and "leaves no block of the model's 4" in result.output


@pytest.mark.slow  # about 50 s: a killed split run and its resume, in subprocesses
def test_resume_after_a_kill_is_bit_identical(tmp_path):
    """SIGKILL a real CLI process mid-run and resume: the same adapter and metrics as an uninterrupted run."""
    args = ["examples/tiny.yaml", *SPLIT, "federation.rounds=5", "training.local_steps=6"]
    assert_resume_matches(args, tmp_path, {*TIMED, "bytes_up"})


def test_every_paradigm_reports_the_clients_cost_and_split_clients_pay_less(tmp_path):
    """client_s, client_peak_bytes and client_flops for parameter sharing and split alike (client.cost)."""
    costs = {}
    for name, extra in [("ps", ["paradigm=parameter_sharing"]), ("split", []), ("kd", ["paradigm=kd"])]:
        kd = (
            ["paradigm.public_slice=6", "data.builtin.public_per_task=8", "paradigm.distill_batch_size=3"]
            if name == "kd"
            else []
        )
        _, metrics = _cli(tmp_path, name, *extra, *kd, "federation.rounds=1", "evaluation.every=0")
        costs[name] = metrics[-1]
        assert costs[name]["client_peak_bytes"] > 0 and costs[name]["client_flops"] > 0
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["client_peak_bytes"] == costs[name]["client_peak_bytes"]
        m = costs[name]  # throughput: the input tokens trained over the round's training seconds
        assert m["train_tokens"] > 0 and m["train_tokens_per_s"] == m["train_tokens"] / m["train_s"]
        assert 0 < m["clients_s"] < m["train_s"]  # the round's time in the clients' hands, inside its own
        assert summary["train_tokens"] == m["train_tokens"]
    # the same clients, batches and steps: split's server counts (from the masks) what a PS client reports
    assert costs["split"]["train_tokens"] == costs["ps"]["train_tokens"]
    # and KD's private training too: its round 1 has no consensus to distil yet (distillation adds on later)
    assert costs["kd"]["train_tokens"] == costs["ps"]["train_tokens"]
    # the U-shaped client holds 2 of the 4 blocks with the embeddings and head, and runs only those
    assert costs["split"]["client_peak_bytes"] < 0.5 * costs["ps"]["client_peak_bytes"]
    assert costs["split"]["client_flops"] < costs["ps"]["client_flops"]


def test_every_command_the_split_example_shows_is_a_valid_config():
    import shlex

    lines = [ln for ln in Path("examples/split.yaml").read_text().splitlines() if "fedtune run examples/split" in ln]
    assert len(lines) >= 3
    for line in lines:
        words = shlex.split(line.lstrip("# ").split("#")[0])
        load_config("examples/split.yaml", words[3:])  # after `fedtune run examples/split.yaml`
