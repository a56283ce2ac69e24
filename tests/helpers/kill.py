"""Kill a real `fedtune run` mid-run, as a crash would: what the resume tests share."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def kill_after_round(args: list[str], run_dir: Path, after: int = 2, timeout_s: float = 120) -> None:
    """Run ``fedtune run ARGS`` in its own process and SIGKILL it once round ``after`` is checkpointed in
    ``run_dir``; fails if the run finished first (the test should make it longer)."""
    env = {**os.environ, "PYTHONPATH": str(Path.cwd() / "src")}
    cmd = [sys.executable, "-m", "fedtune.cli", "run", *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout_s
    while not (run_dir / "checkpoints" / f"round_{after:04d}").exists() and proc.poll() is None:
        if time.time() > deadline:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "summary.json").exists(), "run finished before the kill; make it longer"
