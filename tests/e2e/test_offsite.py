"""Offsite-tuning end to end on the tiny model, through the real CLI: what it reports, what it exports, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedtune.cli import app
from fedtune.reporting.metrics import TIMED
from tests.helpers.configs import TINY_OVERRIDES
from tests.helpers.kill import assert_resume_matches

OFFSITE = [
    *TINY_OVERRIDES,
    "model.name=tiny-llama-deep",
    "paradigm.name=offsite",
    "paradigm.bottom=1",
    "paradigm.top=1",
    "evaluation.exact_match=false",
]
FEDBIOT = [
    "paradigm.emulator=distil",
    "paradigm.distil.steps=4",
    "paradigm.realign.steps=2",
    "data.builtin.public_per_task=4",
]


def _cli(tmp_path: Path, name: str, *extra: str) -> tuple[Path, list[dict]]:
    args = ["run", "examples/tiny.yaml", *OFFSITE, f"output.dir={tmp_path}", f"output.name={name}", *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / name
    return run_dir, [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_plug_in_and_the_emulator_are_both_evaluated_and_the_export_is_the_plug_in(tmp_path):
    """Every evaluated round reports the plug-in (eval_loss) and the emulator (emulator_eval_loss, emulator_gap);
    the exported adapter, loaded onto the full base model as any peft adapter, scores the plug-in's loss."""
    from fedtune.adapters.adapter_model import load_adapter
    from fedtune.assembly import eval_subset
    from fedtune.data.prepare import prepare_federated_data
    from fedtune.data.templates import resolve_template
    from fedtune.data.tokenize import Encoder
    from fedtune.evaluation.harness import EvalSet, evaluate
    from fedtune.models.loading import load_model
    from tests.helpers.configs import tiny_config

    run_dir, rows = _cli(tmp_path, "plain", "training.lr=2e-2")
    for r in rows:
        assert r["emulator_gap"] == pytest.approx(r["emulator_eval_loss"] - r["eval_loss"])
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]  # the plug-in learned
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["emulator_blocks"] == [0, 1, 3] and summary["emulator_params"] < summary["full_params"]
    adapter_cfg = json.loads((run_dir / "final_adapter" / "adapter_config.json").read_text())
    assert sorted(adapter_cfg["layers_to_transform"]) == [0, 3]  # the full model's outer blocks

    cfg = tiny_config(*OFFSITE[len(TINY_OVERRIDES) :])
    loaded = load_model("tiny-llama-deep")
    model = load_adapter(loaded.model, run_dir / "final_adapter")
    d = cfg.data
    template = resolve_template(d.template, loaded.tokenizer)
    encoder = Encoder(loaded.tokenizer, template, d.system_prompt, d.max_seq_len, d.train_on_prompt)
    data = prepare_federated_data(d, cfg.partition, cfg.split_seed())
    eval_set = EvalSet.build(eval_subset(data.eval, cfg.evaluation.max_samples), encoder)
    out = evaluate(model, loaded.tokenizer, eval_set, 16, False, None, None)
    assert out["eval_loss"] == pytest.approx(rows[-1]["eval_loss"], abs=1e-5)


@pytest.mark.slow  # about 40 s: a killed FedBiOT run and its resume, in subprocesses
def test_a_killed_fedbiot_run_resumes_bit_identically(tmp_path):
    """The re-aligned middle is server state: a resumed run sends clients that emulator and ends where an
    uninterrupted one does (bytes down differ: a restarted process is sent the emulator again)."""
    args = ["examples/tiny.yaml", *OFFSITE, *FEDBIOT, "federation.rounds=5", "training.local_steps=6"]
    assert_resume_matches(args, tmp_path, {*TIMED, "bytes_up", "bytes_down"})


def test_a_pruned_emulator_is_smaller_and_its_clients_build_it_from_what_they_are_sent(tmp_path):
    _, rows = _cli(tmp_path, "pruned", "paradigm.drop_ratio=0", "paradigm.prune.mlp_keep=0.5",
                   "paradigm.prune.heads_keep=0.5", "data.builtin.public_per_task=4")  # fmt: skip
    summary = json.loads((tmp_path / "pruned" / "summary.json").read_text())
    assert summary["pruned_mlp_channels"] == 2 * 64 and summary["pruned_kv_heads"] == 2  # 2 middle blocks
    whole = 2 * (64 * 64 * 2 + 2 * 32 * 64 + 3 * 64 * 128)  # the 2 middle blocks' matrices unpruned
    assert summary["full_params"] - summary["emulator_params"] == whole // 2
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"] and all("emulator_gap" in r for r in rows)
