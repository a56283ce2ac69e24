"""Helpers shared by the benchmark scripts: machine facts and result files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import threading
import time
from dataclasses import dataclass
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


@dataclass
class MeasuredRun:
    returncode: int
    output: str  # stdout and stderr together
    wall_s: float
    peak_pss: int  # bytes: the largest sum over the process tree of each process's proportional set size
    peak_rss: int  # bytes: the same for resident set sizes (counts shared pages once per process)
    marked_pss: int = 0  # bytes: the tree's PSS when the command printed the ``mark`` line (0: no mark)


def run_measured(cmd: list[str], every_s: float = 0.5, mark: str | None = None) -> MeasuredRun:
    """Run ``cmd``, sampling its whole process tree's memory (forked lanes, Ray workers, Flower's apps)
    every ``every_s`` seconds. PSS charges each shared page to its processes in shares, so base weights
    that lanes or workers map once count once; RSS counts them in every process. ``mark``: a line the
    command prints when its baseline is reached (e.g. after loading); the next sample is kept."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    marked = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if mark is not None and line.strip() == mark:
                marked.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    root, peak, peak_rss, at_mark = psutil.Process(proc.pid), 0, 0, 0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            pss = sum(_pss(p.pid) for p in tree)
            peak = max(peak, pss)
            peak_rss = max(peak_rss, sum(_rss(p) for p in tree))
            if marked.is_set() and not at_mark:
                at_mark = pss
        except psutil.NoSuchProcess:
            pass
        time.sleep(every_s)
    wall = time.perf_counter() - start
    reader.join()
    return MeasuredRun(proc.returncode, "".join(lines), wall, peak, peak_rss, at_mark)


def _pss(pid: int) -> int:
    """Proportional set size, bytes: private pages plus each shared page's share (0 if the process is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _rss(p) -> int:
    import psutil

    try:
        return p.memory_info().rss
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0


def compared(example: str, comparison: Path | None) -> Path:
    """A finished comparison's directory: ``comparison`` as given, or ``fedtune compare EXAMPLE`` run now."""
    if comparison is not None:
        return comparison
    import sys

    subprocess.run([sys.executable, "-m", "fedtune.cli", "compare", example, "output.progress=false"], check=True)
    return Path("runs") / Path(example).stem
