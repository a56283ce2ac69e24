"""Run a FlowerTune challenge and report it as the leaderboard does: its columns and its communication.

The communication meter is the run's own byte count of every message both ways (``bytes_up`` plus
``bytes_down`` over the rounds), against the leaderboard's 200,000 MB budget, and in GB as the
leaderboard lists it. ``challenge.json`` in the run directory holds the report; a run is marked
"not leaderboard-valid" with each reason (a float base where the challenge quantizes it, another
model, other rounds, a local copy of the dataset).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.core.errors import ConfigError
from fedtune.flowertune.challenges import COMMUNICATION_BUDGET_MB
from fedtune.flowertune.project import Project, deviations, experiment_config, read_project


@dataclass(frozen=True)
class ChallengeRun:
    project: Project
    run_dir: Path
    report: dict[str, Any]


def model_type(name: str) -> str | None:
    """The model's ``config.json`` model_type, where the model is on this machine; else None."""
    from transformers import AutoConfig

    from fedtune.models.loading import resolve_model_dir

    try:
        where, _ = resolve_model_dir(name)
        return AutoConfig.from_pretrained(where, local_files_only=True).model_type
    except Exception:  # an unreachable hub id: the run's model loading says what is wrong
        return None


def prepare(
    pyproject: Path,
    dataset: str | None,
    model: str | None,
    output_dir: str,
    overrides: list[str] | None,
    evaluations: dict[str, str] | None = None,
    eval_tokens: int | None = None,
) -> tuple[Project, Any, list[str]]:
    """(the project, the fedtune config that runs it, why it is not a leaderboard entry)."""
    project = read_project(pyproject)
    if dataset is not None and not Path(dataset).expanduser().exists():
        raise ConfigError(
            f"--dataset {dataset}: no such file or directory (a local copy of {project.static['dataset.name']})"
        )
    kind = model_type(model or str(project.config.get("model.name", "")))
    cfg = experiment_config(project, dataset, model, kind, output_dir, overrides, evaluations, eval_tokens)
    return project, cfg, deviations(project, cfg, kind, dataset is not None)


def challenge_report(
    project: Project, summary: dict[str, Any], history: list[dict[str, Any]], reasons: list[str]
) -> dict[str, Any]:
    up, down = summary["total_bytes_up"], summary["total_bytes_down"]
    total_mb = (up + down) / 1e6
    return {
        "challenge": project.challenge.name,
        "pyproject": str(project.path),
        "leaderboard_valid": not reasons,
        "not_valid_because": reasons,
        "communication": {
            "bytes_up": up,
            "bytes_down": down,
            "total_mb": total_mb,
            "total_gb": total_mb / 1e3,
            "budget_mb": COMMUNICATION_BUDGET_MB,
            "share_of_budget": total_mb / COMMUNICATION_BUDGET_MB,
            "within_budget": total_mb <= COMMUNICATION_BUDGET_MB,
        },
        "columns": columns(project, history),
    }


def columns(project: Project, history: list[dict[str, Any]]) -> dict[str, float | None]:
    """The leaderboard's columns from the last scores of the run (None: not evaluated), and their average
    once every column is scored."""
    out: dict[str, float | None] = {c: None for c in project.challenge.columns}
    for column in project.challenge.evaluations:
        key = f"{column.task}_{column.metric}"
        scored = [r for r in history if key in r]
        if scored:
            last = scored[-1]
            by_group = last.get(f"{key}_by_group") or {}
            out[column.name] = last[key] if column.group is None else by_group.get(column.group)
    values = [v for v in out.values() if v is not None]
    out["Average"] = sum(values) / len(values) if len(values) == len(project.challenge.columns) else None
    return out


def run_challenge(
    pyproject: Path,
    dataset: str | None = None,
    model: str | None = None,
    output_dir: str = "runs",
    overrides: list[str] | None = None,
    resume: bool = False,
    evaluations: dict[str, str] | None = None,
    eval_tokens: int | None = None,
) -> ChallengeRun:
    from fedtune.experiment import run_experiment

    project, cfg, reasons = prepare(pyproject, dataset, model, output_dir, overrides, evaluations, eval_tokens)
    result = run_experiment(cfg, project.path, resume=resume)
    report = challenge_report(project, result.summary, result.state.history, reasons)
    (result.run_dir / "challenge.json").write_text(json.dumps(report, indent=2) + "\n")
    return ChallengeRun(project, result.run_dir, report)
