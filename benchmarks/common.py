"""Helpers shared by the benchmark scripts: machine facts and result files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def git_commit() -> str | None:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {
        "benchmark": name,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "commit": git_commit(),
        "machine": machine(),
        **payload,
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(payload, indent=2))
    return path


def merge_rows(name: str, rows: list[dict], key: str, order: list[str]) -> list[dict]:
    """Fresh rows plus the saved rows of results/<name>.json that were not re-run (``--only``),
    in ``order`` of their ``key``; saved rows whose key is no longer in ``order`` are dropped."""
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        return rows
    fresh = {r[key] for r in rows}
    kept = [r for r in json.loads(path.read_text())["rows"] if r[key] not in fresh and r[key] in order]
    return sorted(kept + rows, key=lambda r: order.index(r[key]))


def quickstart_setup(rounds: int, steps: int, **extra) -> dict:
    """The setup block of a benchmark that runs the quickstart config shortened or as is."""
    return {
        "config": "examples/quickstart.yaml",
        "rounds": rounds,
        "local_steps": steps,
        "clients": 4,
        "partition": "by_field task",
        "eval_examples": 40,
        **extra,
    }


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of a 95% t-interval (0 for one value): fedtune.reporting.stats's."""
    from fedtune.reporting.stats import interval as t_interval

    found = t_interval(values)
    return found.mean, found.half


def plus_minus(value: float, half: float, fmt: str) -> str:
    """'1.234 ± 0.056', or the value alone when there is no interval."""
    return f"{value:{fmt}} ± {half:{fmt}}" if half else f"{value:{fmt}}"
