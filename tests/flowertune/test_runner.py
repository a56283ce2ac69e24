"""A challenge from the fixtures through the real CLI: 2 rounds on the tiny model, budget and columns reported."""

import json

import pytest

from fedtune.data.builtin.shaped import records
from tests.flowertune.fixtures import challenge_data, challenge_project
from tests.helpers.cli import cli, read_metrics


def test_a_challenge_runs_two_rounds_and_reports_its_budget_and_columns(tmp_path):
    project = challenge_project(tmp_path, "finance")
    data = challenge_data(tmp_path, "finance", 150)
    sets = {}
    for name in ("fpb", "fiqa", "tfns"):
        sets[name] = tmp_path / f"{name}.jsonl"
        sets[name].write_text("".join(json.dumps(r) + "\n" for r in records(name, 6)))
    code, out = cli(
        "flowertune", str(project), "--dataset", str(data), "--model", "tiny-llama", "--out", str(tmp_path / "runs"),
        "--eval", f"fpb={sets['fpb']}", "--eval", f"FIQA={sets['fiqa']}", "--eval", f"tfns={sets['tfns']}",
        "--eval-tokens", "4",
        "federation.rounds=2", "training.local_steps=2", "training.batch_size=2", "data.max_seq_len=256",
        "evaluation.max_samples=8",
    )  # fmt: skip
    assert code == 0, out
    run_dir = tmp_path / "runs" / "flowertune-finance"
    metrics = read_metrics(run_dir)
    assert [m["round"] for m in metrics] == [0, 1, 2] and all(len(m["clients"]) == 2 for m in metrics[1:])
    report = json.loads((run_dir / "challenge.json").read_text())
    sent = sum(m["bytes_up"] + m["bytes_down"] for m in metrics[1:])
    c = report["communication"]
    assert c["bytes_up"] + c["bytes_down"] == sent and c["total_mb"] == pytest.approx(sent / 1e6)
    assert c["total_gb"] == pytest.approx(sent / 1e9)
    assert c["budget_mb"] == 200_000 and c["within_budget"]
    columns = report["columns"]
    assert list(columns) == ["FPB", "FIQA", "TFNS", "Average"] and all(0 <= v <= 1 for v in columns.values())
    assert columns["FPB"] == metrics[-1]["fpb_accuracy"] and columns["Average"] == pytest.approx(
        sum(columns[c] for c in ("FPB", "FIQA", "TFNS")) / 3
    )
    assert "fpb_accuracy" in metrics[0]  # the base model scored too
    assert report["leaderboard_valid"] is False
    reasons = " ".join(report["not_valid_because"])
    assert "4-bit" in reasons and "tiny-llama" in reasons and "2 rounds" in reasons and "local copy" in reasons
    assert "of the 200,000 MB budget" in out and "not leaderboard-valid" in out
    # what the clients trained on: FlowerTune's prompt, instruction and input joined by a space
    saved = (run_dir / "config.yaml").read_text()
    assert "template: flowertune" in saved and "schedule_scope: by_round" in saved


def test_a_missing_local_copy_is_named(tmp_path):
    code, out = cli("flowertune", str(challenge_project(tmp_path, "code")), "--dataset", str(tmp_path / "nope.jsonl"))
    assert code != 0 and "nope.jsonl: no such file" in out


def test_columns_fedtune_cannot_score_as_flowertune_does_are_refused(tmp_path):
    from fedtune.core.errors import ConfigError
    from fedtune.flowertune.project import evaluation_tasks, read_project

    with pytest.raises(ConfigError, match="from these sets: humaneval, mbpp, multiple_cpp, multiple_js"):
        evaluation_tasks(read_project(challenge_project(tmp_path, "code")), {"mmlu": "m.jsonl"})
    with pytest.raises(ConfigError, match="from these sets: fiqa, fpb, tfns"):
        evaluation_tasks(read_project(challenge_project(tmp_path, "finance")), {"mmlu": "m.jsonl"})
    code, out = cli("flowertune", str(challenge_project(tmp_path, "finance")), "--eval", "fpb")
    assert code != 0 and "give COLUMN=PATH" in out


def test_the_general_nlp_columns_are_flowertunes_mmlu_categories(tmp_path):
    rows = records("mmlu", 9)  # 3 subjects: elementary_mathematics, high_school_statistics (stem), computer_science
    subjects = ["elementary_mathematics", "econometrics", "philosophy"]  # one of each column's category
    for i, row in enumerate(rows):
        row["subject"] = subjects[i % 3]
    mmlu = tmp_path / "mmlu.jsonl"
    mmlu.write_text("".join(json.dumps(r) + "\n" for r in rows))
    project = challenge_project(tmp_path, "general_nlp")
    data = challenge_data(tmp_path, "general_nlp", 60)
    code, out = cli(
        "flowertune", str(project), "--dataset", str(data), "--model", "tiny-llama", "--out", str(tmp_path / "runs"),
        "--eval", f"mmlu={mmlu}", "federation.rounds=1", "training.local_steps=1", "training.batch_size=2",
        "data.max_seq_len=256", "evaluation.max_samples=4",
    )  # fmt: skip
    assert code == 0, out
    run_dir = tmp_path / "runs" / "flowertune-general-nlp"
    last = read_metrics(run_dir)[-1]
    report = json.loads((run_dir / "challenge.json").read_text())
    groups = last["mmlu_accuracy_by_group"]
    assert set(groups) == {"stem", "social_sciences", "humanities"}
    assert report["columns"] == {
        "STEM": groups["stem"],
        "SocialSciences": groups["social_sciences"],
        "Humanities": groups["humanities"],
        "Average": pytest.approx(sum(groups.values()) / 3),
    }


def _scored_run(tmp_path, challenge, sets, *extra):
    """A 1-round run of ``challenge`` on the tiny model with ``sets`` ({task: rows}) as --eval: the last
    metrics record and challenge.json's columns."""
    evals = []
    for task, rows in sets.items():
        path = tmp_path / f"{task}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        evals += ["--eval", f"{task}={path}"]
    data = challenge_data(tmp_path, challenge, 60)
    code, out = cli(
        "flowertune", str(challenge_project(tmp_path, challenge)), "--dataset", str(data), "--model", "tiny-llama",
        "--out", str(tmp_path / "runs"), *evals, *extra, "federation.rounds=1", "training.local_steps=1",
        "training.batch_size=2", "data.max_seq_len=256",
    )  # fmt: skip
    assert code == 0, out
    run_dir = tmp_path / "runs" / f"flowertune-{challenge.replace('_', '-')}"
    return read_metrics(run_dir)[-1], json.loads((run_dir / "challenge.json").read_text())["columns"]


def test_the_medical_columns_are_flowertunes_four_benchmarks(tmp_path):
    sets = {name: records(name, 5) for name in ("pubmedqa", "medmcqa", "medqa", "careqa")}
    last, columns = _scored_run(tmp_path, "medical", sets)
    assert list(columns) == ["PubMedQA", "MedMCQA", "MedQA", "CareQA", "Average"]
    for column, task in (("PubMedQA", "pubmedqa"), ("MedMCQA", "medmcqa"), ("MedQA", "medqa"), ("CareQA", "careqa")):
        assert columns[column] == last[f"{task}_accuracy"] and last[f"{task}_accuracy"] in {0, 0.2, 0.4, 0.6, 0.8, 1}
    assert columns["Average"] == pytest.approx(sum(v for k, v in columns.items() if k != "Average") / 4)


def test_the_code_columns_are_pass_at_1_of_the_harness_benchmarks(tmp_path):
    sets = {
        task: [r for r in records(recipe, 4) if language is None or r["language"] == language][:2]
        for task, recipe, language in (
            ("mbpp", "mbpp", None), ("humaneval", "humaneval", None),
            ("multiple_js", "multipl_e", "js"), ("multiple_cpp", "multipl_e", "cpp"),
        )
    }  # fmt: skip
    last, columns = _scored_run(tmp_path, "code", sets, "--eval-tokens", "6")
    assert list(columns) == ["MBPP", "HumanEval", "MultiPL-E (JS)", "MultiPL-E (C++)", "Average"]
    for column, task in (
        ("MBPP", "mbpp"), ("HumanEval", "humaneval"), ("MultiPL-E (JS)", "multiple_js"),
        ("MultiPL-E (C++)", "multiple_cpp"),
    ):  # fmt: skip
        assert columns[column] == last[f"{task}_pass_at_1"]
    saved = (tmp_path / "runs" / "flowertune-code" / "config.yaml").read_text()
    assert "benchmark: multiple_cpp" in saved and "max_new_tokens: 6" in saved
