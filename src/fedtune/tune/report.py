"""A search's record: tune.json (every trial, the best, the rounds spent) and tune.md (its table)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedtune.config import ExperimentConfig


def summary(study: Any, base: ExperimentConfig) -> dict[str, Any]:
    """Every trial's setting, state, rounds run and last reported value; the best finished one."""
    t = base.tune
    trials = []
    for tr in study.get_trials(deepcopy=False):
        steps = sorted(tr.intermediate_values)
        trials.append(
            {
                "number": tr.number,
                "params": dict(tr.params),
                "state": tr.state.name.lower(),
                "rounds": steps[-1] if steps else 0,
                "value": tr.value if tr.value is not None else (tr.intermediate_values[steps[-1]] if steps else None),
                "curve": {str(s): tr.intermediate_values[s] for s in steps},
                "run_dir": f"trials/trial-{tr.number:03d}",
                **({"error": tr.user_attrs["error"]} if "error" in tr.user_attrs else {}),
            }
        )
    finished = [x for x in trials if x["state"] == "complete"]
    sign = 1 if t.direction() == "minimize" else -1
    best = min(finished, key=lambda x: (sign * x["value"], x["number"])) if finished else None
    return {
        "metric": t.metric,
        "direction": t.direction(),
        "sampler": t.sampler,
        "scheduler": t.scheduler,
        "min_rounds": t.min_rounds,
        "reduction_factor": t.reduction_factor,
        "max_rounds": base.federation.rounds,
        "budget_trials": t.trials,
        "rounds_spent": sum(x["rounds"] for x in trials),
        "rounds_without_stopping": t.trials * base.federation.rounds,
        "space": {k: v.model_dump(exclude_defaults=True) for k, v in t.space.items()},
        "best": best,
        "trials": trials,
    }


def markdown(s: dict[str, Any], command: str) -> str:
    keys = list(s["space"])
    lines = [
        f"# Search: {s['metric']}, {s['direction']}d ({s['sampler']} search, {s['scheduler']})",
        "",
        f"`{command}`",
        "",
        f"{len(s['trials'])} of {s['budget_trials']} trials, {s['rounds_spent']} rounds run of "
        f"{s['rounds_without_stopping']} without stopping (at most {s['max_rounds']} a trial).",
        "",
        "| trial | " + " | ".join(keys) + f" | state | rounds | {s['metric']} |",
        "|---:|" + "---:|" * len(keys) + "---|---:|---:|",
    ]
    sign = 1 if s["direction"] == "minimize" else -1  # best first
    order = sorted(s["trials"], key=lambda x: (x["value"] is None, sign * x["value"] if x["value"] is not None else 0))
    for x in order:
        cells = [_cell(x["params"].get(k)) for k in keys]
        value = f"{x['value']:.4f}" if x["value"] is not None else "-"
        best = " (best)" if s["best"] is not None and x["number"] == s["best"]["number"] else ""
        lines.append(f"| {x['number']}{best} | " + " | ".join(cells) + f" | {x['state']} | {x['rounds']} | {value} |")
    return "\n".join(lines) + "\n"


def _cell(v: Any) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def write_report(study: Any, base: ExperimentConfig, directory: Path, command: str) -> Path:
    s = summary(study, base)
    (directory / "tune.json").write_text(json.dumps({"command": command, **s}, indent=1))
    path = directory / "tune.md"
    path.write_text(markdown(s, command))
    return path
