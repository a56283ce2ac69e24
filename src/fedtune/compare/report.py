"""A comparison's results: comparison.json (every run's measures and each variant's intervals),
comparison.md (the table, the ranking the intervals allow, the plots) and the PNG plots.

Runs not finished yet are left out and the files say how many of each variant's seeds they hold.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedtune.compare.measures import MEASURES, read_history, run_measures
from fedtune.compare.plan import Plan
from fedtune.reporting.stats import Interval, interval, tiers

# measure -> (column title, format, scale)
COLUMNS: dict[str, tuple[str, str, float]] = {
    "final_eval_loss": ("final eval loss", ".3f", 1.0),
    "start_eval_loss": ("start eval loss", ".3f", 1.0),
    "final_accuracy": ("exact-match %", ".1f", 100.0),
    "rounds_to_target": ("rounds to target", ".1f", 1.0),
    "bytes_up_per_client": ("MB up / client", ".2f", 1e-6),
    "bytes_down_per_client": ("MB down / client", ".2f", 1e-6),
    "client_s_per_round": ("client s / round", ".2f", 1.0),
    "client_peak_bytes": ("client peak MB", ".0f", 1e-6),
    "client_flops_per_round": ("client GFLOP / round", ".1f", 1e-9),
    "server_s_per_round": ("server s / round", ".2f", 1.0),
    "epsilon": ("epsilon", ".2f", 1.0),
    "final_emulator_gap": ("emulator gap", ".3f", 1.0),
    "final_client_eval_loss": ("clients' shares: global loss", ".3f", 1.0),
    "final_personal_eval_loss": ("clients' shares: personal loss", ".3f", 1.0),
    "final_personal_gain": ("personal gain", ".3f", 1.0),
    "start_preference_accuracy": ("start preference acc. %", ".1f", 100.0),
    "final_preference_accuracy": ("preference acc. %", ".1f", 100.0),
    "final_reward_accuracy": ("reward acc. %", ".1f", 100.0),
}
RANKED = {"final_eval_loss": True, "final_accuracy": False}  # measure -> lower is better


def collect(plan: Plan) -> dict[str, Any]:
    """Every finished run's measures and curves, and per variant the interval of each measure."""
    target = plan.base.compare.target_loss
    variants: dict[str, Any] = {}
    for name in plan.variants:
        runs = []
        for run in plan.of(name):
            summary = run.run_dir / "summary.json"
            if not summary.is_file():
                continue
            measured = run_measures(read_history(run.run_dir), run.config.partition.num_clients, target)
            runs.append({"seed": run.seed, "run_dir": str(run.run_dir), **measured})
        stats: dict[str, Any] = {}
        for key in [*MEASURES, *_benchmarks(runs)]:
            values = [r["measures"][key] for r in runs if r["measures"].get(key) is not None]
            stats[key] = interval(values).as_dict() if values else None
        if target is not None:
            stats["rounds_to_target_reached"] = f"{sum(r['measures']['rounds_to_target'] is not None for r in runs)}"
            stats["rounds_to_target_reached"] += f"/{len(runs)}"
        variants[name] = {"overrides": plan.base.compare.variants[name], "seeds_done": len(runs), "runs": runs}
        variants[name]["summary"] = stats
    ranking = {}
    for key, lower in _ranked(variants).items():
        found = {n: _interval(v["summary"][key]) for n, v in variants.items() if v["summary"].get(key) is not None}
        ranking[key] = tiers(found, lower) if len(found) == len(variants) else None
    return {"variants": variants, "ranking": ranking}


def _benchmarks(runs: list[dict[str, Any]]) -> list[str]:
    """The evaluation.tasks measures (``final_{task}_{metric}``) any run has, in first-seen order."""
    return list(dict.fromkeys(k for r in runs for k in r["measures"] if k not in MEASURES))


def _ranked(variants: dict[str, Any]) -> dict[str, bool]:
    """Measures ranked (-> lower is better): the loss, exact-match, and every benchmark score (higher is better)."""
    found = dict.fromkeys(k for v in variants.values() for k in v["summary"] if k.startswith("final_"))
    return RANKED | {k: False for k in found if k not in COLUMNS}


def _columns(variants: dict[str, Any]) -> dict[str, tuple[str, str, float]]:
    """The table's columns: the fixed ones and one per benchmark score (as a percentage)."""
    extra = dict.fromkeys(k for v in variants.values() for k in v["summary"] if k.startswith("final_"))
    return COLUMNS | {
        k: (k.removeprefix("final_").replace("_", " ") + " %", ".1f", 100.0) for k in extra if k not in COLUMNS
    }


def _interval(d: dict[str, Any]) -> Interval:
    return Interval(d["mean"], d["half_width"], d["n"])


def write_report(plan: Plan, command: str, plots: bool, failed: dict[str, str] | None = None) -> Path:
    """comparison.json and comparison.md (with ``plots``, the PNGs too); ``failed``: run name -> why."""
    data = collect(plan)
    out = {
        "command": command,
        "directory": str(plan.directory),
        "seeds": plan.seeds,
        "target_loss": plan.base.compare.target_loss,
        "measures": MEASURES,
        **data,
        "failed": failed or {},
    }
    (plan.directory / "comparison.json").write_text(json.dumps(out, indent=2) + "\n")
    images = []
    if plots and any(v["runs"] for v in data["variants"].values()):
        from fedtune.compare.plots import draw_plots

        images = draw_plots(data["variants"], plan.directory)
    path = plan.directory / "comparison.md"
    path.write_text(markdown(out, images))
    return path


def markdown(result: dict[str, Any], images: list[Path]) -> str:
    variants = result["variants"]
    table = _columns(variants)
    columns = [k for k in table if any(v["summary"].get(k) is not None for v in variants.values())]
    lines = [
        "# Comparison",
        "",
        f"`{result['command']}`",
        "",
        f"Seeds {', '.join(map(str, result['seeds']))}. Each cell is the mean over seeds ± the half-width of its "
        "95% t-interval (a lone value: one seed). Per client figures are per sampled client and round, bytes "
        "over the whole run.",
        "",
        "| variant | seeds | " + " | ".join(table[k][0] for k in columns) + " |",
        "|---|---:|" + "---:|" * len(columns),
    ]
    for name, v in variants.items():
        cells = []
        for key in columns:
            stat = v["summary"].get(key)
            title, fmt, scale = table[key]
            cells.append(_interval(stat).text(fmt, scale) if stat is not None else "–")
            if key == "rounds_to_target" and result.get("target_loss") is not None:
                cells[-1] += f" ({v['summary']['rounds_to_target_reached']} reached)"
        lines.append(f"| {name} | {v['seeds_done']} | " + " | ".join(cells) + " |")
    lines += ["", "## Ranking", ""]
    for key, lower in _ranked(variants).items():
        order = result["ranking"].get(key)
        title = table[key][0]
        if order is None:
            lines.append(f"- {title}: not ranked (a variant has fewer than 2 finished seeds or no value).")
            continue
        if len(order) == 1:
            lines.append(f"- {title}: every interval overlaps, so no variant is ranked above another.")
            continue
        best = "lower" if lower else "higher"
        tiers_text = "; ".join(f"{i}. " + ", ".join(t) for i, t in enumerate(order, 1))
        lines.append(
            f"- {title} ({best} is better), in tiers; variants in one tier have overlapping intervals (directly or "
            f"through another) and are not ranked among themselves: {tiers_text}."
        )
    if result["failed"]:
        lines += ["", "## Failed runs", ""] + [f"- `{name}`: {why}" for name, why in result["failed"].items()]
    if images:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in images]
    return "\n".join(lines) + "\n"
