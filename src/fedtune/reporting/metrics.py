"""metrics.jsonl (one JSON object per round) and summary.json."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

# a record's measured times, and the rates derived from them: the keys two identical runs may differ in
TIMED = frozenset(
    {
        "wall_s",
        "train_s",
        "eval_s",
        "clients_s",
        "local_train_s",
        "server_part_s",
        "server_distill_s",
        "train_tokens_per_s",
    }
)


def _clean(value: Any) -> Any:
    """JSON has no NaN/Inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


class MetricsWriter:
    def __init__(self, path: Path):
        self.path = path

    def rewrite(self, history: list[dict[str, Any]]) -> None:
        """Replace the file with exactly these records (on start and resume: the checkpoint is the truth)."""
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(json.dumps(_clean(r)) + "\n" for r in history))
        os.replace(tmp, self.path)

    def append(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(_clean(record)) + "\n")
            f.flush()
            os.fsync(f.fileno())


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# the scalar metrics of evaluation.tasks (``{task}_accuracy``, ``{task}_rouge_l``, ``{task}_pass_at_1``, ...):
# what summaries and comparisons report of each benchmark (the kinds' tests hold them to this pattern)
BENCHMARK_METRIC = re.compile(r"^(?!eval_)[a-z][a-z0-9_]*_(accuracy|accuracy_macro|macro_f1|rouge_l|pass_at_\d+)$")


def benchmark_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The benchmark scores in one round's record."""
    return {k: v for k, v in record.items() if BENCHMARK_METRIC.match(k) and isinstance(v, (int, float))}


def summarize(history: list[dict[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
    """Start vs end of the run, totals, and the best round."""
    evals = [r for r in history if r.get("eval_loss") is not None]
    trained = [r for r in history if r["round"] > 0]
    first, last = (evals[0], evals[-1]) if evals else ({}, {})
    pairs = ("eval_reward_accuracy", "eval_reward_margin", "eval_preference_accuracy")  # on preference pairs
    keys = [k for k in ("eval_loss", "eval_ppl", "eval_accuracy", *pairs) if k in last]
    out: dict[str, Any] = {
        **extra,
        "rounds_completed": max((r["round"] for r in history), default=0),
        "initial": {"round": first.get("round"), **{k: first.get(k) for k in keys}},
        "final": {"round": last.get("round"), **{k: last.get(k) for k in keys}},
        "total_bytes_up": sum(r["bytes_up"] for r in trained),
        "total_bytes_down": sum(r["bytes_down"] for r in trained),
        "total_local_train_s": sum(r.get("local_train_s", 0.0) for r in trained),  # a paradigm may not train
        "total_wall_s": sum(r["wall_s"] for r in history),
        "dropped_updates": sum(len(r.get("dropped", {})) for r in trained),
    }
    costs = [r for r in trained if "client_flops" in r]
    if costs:  # client.cost: what the clients' side of a round took, for comparing paradigms
        out["client_peak_bytes"] = max(r["client_peak_bytes"] for r in costs)
        out["client_flops_per_round"] = sum(r["client_flops"] for r in costs) / len(costs)
        out["client_s_per_round"] = sum(r["local_train_s"] for r in costs) / len(costs)
    fed = [r for r in trained if r.get("train_tokens")]
    if fed:  # the rounds' training throughput, wall clock: input tokens over the seconds the rounds trained
        out["train_tokens"] = sum(r["train_tokens"] for r in fed)
        out["train_tokens_per_s"] = out["train_tokens"] / max(1e-9, sum(r["train_s"] for r in fed))
    for k in (k for k in last if k.startswith("eval_accuracy_by_")):  # per task (or other group_by field)
        out["initial"][k], out["final"][k] = first.get(k), last[k]
    benchmarks = [r for r in evals if benchmark_metrics(r)]  # evaluation.tasks: scored at the start and the end
    if benchmarks:
        out["initial"] |= benchmark_metrics(benchmarks[0]) if benchmarks[0]["round"] == 0 else {}
        out["final"] |= benchmark_metrics(benchmarks[-1])
    scored = [r for r in evals if r.get("eval_accuracy") is not None]  # exact_match=final: the last one only
    if scored and "eval_accuracy" in last:
        best = max(scored, key=lambda r: r["eval_accuracy"])
        out["best"] = {"round": best["round"], "eval_accuracy": best["eval_accuracy"]}
    return _clean(out)
