"""What the user sees: a line per round, a final table, log records that do not break progress bars."""

from __future__ import annotations

import logging
import sys
from typing import Any

from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

from fedtune.reporting.metrics import benchmark_metrics

console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)


_SILENT = False


def bar_disabled(progress: bool) -> bool | None:
    """tqdm's disable flag: off when asked or silenced, and (None) off automatically when stderr is not a terminal."""
    return True if not progress or _SILENT else None


def silence_bars() -> None:
    """No progress bars from this process from now on (a worker whose bars would interleave with others')."""
    global _SILENT
    _SILENT = True


class TqdmHandler(logging.Handler):
    """Route log records through tqdm.write so they print above active bars."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record))
        except Exception:
            self.handleError(record)


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}"


def _f(x: Any, fmt: str = ".4f") -> str:
    return "-" if x is None else format(x, fmt)


PAIR_METRICS = {"eval_reward_accuracy": "reward accuracy", "eval_preference_accuracy": "preference accuracy"}


def round_line(rec: dict[str, Any], rounds: int) -> str:
    parts = [f"round {rec['round']}/{rounds}"]
    if rec["round"] > 0:
        parts += [f"clients {len(rec['clients'])}", f"train_loss {_f(rec.get('train_loss'))}"]
    if rec.get("eval_loss") is not None:
        parts.append(f"eval_loss {_f(rec['eval_loss'])}")
    if rec.get("eval_accuracy") is not None:
        parts.append(f"accuracy {rec['eval_accuracy']:.1%}")
    parts += [f"{label} {rec[key]:.1%}" for key, label in PAIR_METRICS.items() if rec.get(key) is not None]
    if rec["round"] > 0:
        parts += [f"up {_mb(rec['bytes_up'])} MB", f"down {_mb(rec['bytes_down'])} MB"]
    if rec.get("dp_epsilon") is not None:
        parts.append(f"epsilon {rec['dp_epsilon']:.3g}")
    parts += [f"{k} {v:.1%}" for k, v in benchmark_metrics(rec).items()]
    parts.append(f"{rec['wall_s']:.1f}s")
    return " | ".join(parts)


def rounds_table(history: list[dict[str, Any]]) -> Table:
    table = Table(title="rounds", title_justify="left")
    for col in ("round", "clients", "train loss", "eval loss", "accuracy", "up MB", "down MB", "local s", "wall s"):
        table.add_column(col, justify="right")
    for r in history:
        acc = r.get("eval_accuracy")
        table.add_row(
            str(r["round"]),
            str(len(r.get("clients", []))) if r["round"] else "-",
            _f(r.get("train_loss")),
            _f(r.get("eval_loss")),
            "-" if acc is None else f"{acc:.1%}",
            _mb(r.get("bytes_up")),
            _mb(r.get("bytes_down")),
            _f(r.get("local_train_s"), ".1f"),
            _f(r.get("wall_s"), ".1f"),
        )
    return table


def summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title="summary", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    ini, fin = summary["initial"], summary["final"]
    if fin.get("eval_loss") is not None:
        table.add_row("eval loss (start -> end)", f"{_f(ini.get('eval_loss'))} -> {_f(fin['eval_loss'])}")
    if fin.get("eval_accuracy") is not None:
        start = _f(ini.get("eval_accuracy"), ".1%")  # none at the start with evaluation.exact_match=final
        table.add_row("exact-match (start -> end)", f"{start} -> {fin['eval_accuracy']:.1%}")
        for key in (k for k in fin if k.startswith("eval_accuracy_by_")):
            for group, acc in fin[key].items():
                start = (ini.get(key) or {}).get(group)
                table.add_row(f"  {group}", f"{_f(start, '.0%')} -> {acc:.0%}")
    for key, label in PAIR_METRICS.items():  # preference pairs
        if fin.get(key) is not None:
            table.add_row(f"{label} (start -> end)", f"{_f(ini.get(key), '.1%')} -> {fin[key]:.1%}")
    for key in benchmark_metrics(fin):  # evaluation.tasks
        table.add_row(f"{key} (start -> end)", f"{_f(ini.get(key), '.1%')} -> {fin[key]:.1%}")
    table.add_row("rounds", str(summary["rounds_completed"]))
    privacy = summary.get("privacy")
    if privacy:
        eps = privacy["epsilon"]  # None: not finite (no noise: clipping alone protects nothing)
        table.add_row(
            "client-level DP",
            f"epsilon {'infinite' if eps is None else format(eps, '.3g')} at delta {privacy['delta']:g} "
            f"(z {privacy['noise_multiplier']:.3g}, "
            f"C {privacy['clip_norm']:g}, {privacy['sampling']} q {privacy['sample_rate']:.3g})",
        )
    table.add_row("trainable params", f"{summary['trainable_params']:,} ({summary['trainable_fraction']:.3%})")
    table.add_row("bytes up / down", f"{_mb(summary['total_bytes_up'])} MB / {_mb(summary['total_bytes_down'])} MB")
    table.add_row("local training / wall", f"{summary['total_local_train_s']:.1f}s / {summary['total_wall_s']:.1f}s")
    if summary["dropped_updates"]:
        table.add_row("dropped updates", str(summary["dropped_updates"]))
    table.add_row("final adapter", summary["final_adapter"])
    return table
