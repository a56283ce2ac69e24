"""A FlowerTune challenge on the bundled SmolLM2 through the CLI: trained, its columns scored FlowerTune's
way with the real tokenizer, then the final model handed to lm-evaluation-harness."""

from __future__ import annotations

import json

import pytest

from fedtune.data.builtin.shaped import records
from tests.flowertune.fixtures import challenge_data, challenge_project
from tests.helpers.cli import cli, read_metrics
from tests.helpers.lm_eval_tasks import write_mc_task


@pytest.mark.slow
def test_the_medical_challenge_on_the_bundled_model_scores_its_columns_and_hands_off_to_lm_eval(tmp_path, monkeypatch):
    sets = {}
    for name in ("pubmedqa", "medmcqa", "medqa", "careqa"):
        sets[name] = tmp_path / f"{name}.jsonl"
        sets[name].write_text("".join(json.dumps(r) + "\n" for r in records(name, 4)))
    evals = [a for name, path in sets.items() for a in ("--eval", f"{name}={path}")]
    code, out = cli(
        "flowertune", str(challenge_project(tmp_path, "medical")), "--dataset",
        str(challenge_data(tmp_path, "medical", 40)), "--model", "smollm2-135m", "--out", str(tmp_path / "runs"),
        *evals, "federation.rounds=1", "training.local_steps=1", "training.batch_size=2", "data.max_seq_len=128",
        "evaluation.max_samples=4",
    )  # fmt: skip
    assert code == 0, out
    run_dir = tmp_path / "runs" / "flowertune-medical"
    first, last = read_metrics(run_dir)[0], read_metrics(run_dir)[-1]
    columns = json.loads((run_dir / "challenge.json").read_text())["columns"]
    for column, task in (("PubMedQA", "pubmedqa"), ("MedMCQA", "medmcqa"), ("MedQA", "medqa"), ("CareQA", "careqa")):
        assert columns[column] == last[f"{task}_accuracy"] and f"{task}_accuracy" in first
    saved = json.loads((run_dir / "final_adapter" / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == ["q_proj", "v_proj"]  # peft's default for Llama, as FlowerTune's
    assert sorted(p.name for p in (run_dir / "adapters").iterdir()) == ["round_0001"]  # save-every-round: the last

    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    data = tmp_path / "mmlu.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records("mmlu", 6)))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_mc_task(tasks, "shaped_mc", data, "answer")
    code, out = cli("lm-eval", str(run_dir), "--tasks", "shaped_mc", "--include-path", str(tasks), "--batch-size", "6")
    assert code == 0, out
    acc = json.loads((run_dir / "lm_eval.json").read_text())["scores"]["final"]["shaped_mc"]["acc,none"]
    assert acc in {i / 6 for i in range(7)}
