"""Run a comparison: every planned run in turn, resumably, then its table and plots.

A run whose directory holds a summary for all its rounds is finished and is not run again; one with
checkpoints continues from its last round (``--resume``); any other starts afresh. A finished run
made with a different config than planned is an error naming the differences, never silently reused.
The comparison's files are rewritten after every run, so a killed comparison keeps what it measured.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from fedtune.compare.plan import Plan, PlannedRun
from fedtune.compare.report import write_report
from fedtune.core.errors import ConfigError, FedtuneError, RunError
from fedtune.experiment import run_experiment, saved_config_changes
from fedtune.reporting.console import console

log = logging.getLogger(__name__)
FREE_TO_DIFFER = ("output.progress", "federation.rounds")  # may change between a run and its re-planning


def status(run: PlannedRun) -> str:
    """'done', 'resume' (checkpoints to continue from) or 'new'."""
    d = run.run_dir
    if (d / "summary.json").is_file():
        _check_same_config(run)
        done = json.loads((d / "summary.json").read_text()).get("rounds_completed", 0)
        if done >= run.config.federation.rounds:
            return "done"
    return "resume" if any((d / "checkpoints").glob("round_*")) else "new"


def _check_same_config(run: PlannedRun) -> None:
    lines = saved_config_changes(run.run_dir, run.config, FREE_TO_DIFFER)
    if lines:
        raise ConfigError(
            f"{run.run_dir} was run with a different config than variant {run.variant!r} seed {run.seed} now has "
            f"({lines}). Delete that directory to rerun it, or give the comparison a new output.name"
        )


def run_comparison(plan: Plan, command: str) -> Path:
    """Run what is not finished, then write comparison.json, comparison.md and the plots."""
    plan.directory.mkdir(parents=True, exist_ok=True)
    states = {id(r): status(r) for r in plan.runs}  # every finished run checked before any work starts
    total = len(plan.runs)
    done_before = sum(s == "done" for s in states.values())
    console.print(
        f"comparison {plan.directory}: {len(plan.variants)} variants x {len(plan.seeds)} seeds = {total} runs"
        + (f", {done_before} already finished" if done_before else "")
    )
    failed: dict[str, str] = {}
    for k, run in enumerate(plan.runs, 1):
        what = f"[{k}/{total}] {run.variant} seed {run.seed}"
        state = states[id(run)]
        if state == "done":
            console.print(f"{what}: finished before, kept")
            continue
        console.print(f"{what}: {'continuing' if state == 'resume' else 'running'} -> {run.run_dir}")
        try:
            run_experiment(run.config, resume=state == "resume")
        except FedtuneError as exc:  # one run's failure (say, every client diverged) does not stop the others
            failed[run.run_dir.name] = str(exc)
            console.print(f"{what}: failed: {exc}", markup=False)
            log.warning("%s failed: %s", run.run_dir, exc)
        write_report(plan, command, plots=False, failed=failed)  # what is measured so far survives a kill
    path = write_report(plan, command, plots=True, failed=failed)
    console.print(f"comparison written to {path}")
    if failed:
        raise RunError(
            f"{len(failed)} of {total} runs failed ({', '.join(failed)}); the comparison holds the others. "
            "Fix the cause and run the same command again: only unfinished runs run"
        )
    return path
