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


def assert_resume_matches(args: list[str], root: Path, drop: set[str]) -> None:
    """``fedtune run ARGS`` straight, and killed after round 2 then resumed (both under ``root``): the same final
    adapter to the byte, and the same metrics but the keys in ``drop``."""
    import json

    from typer.testing import CliRunner

    from fedtune.cli import app

    args = [*args, f"output.dir={root}"]
    assert CliRunner().invoke(app, ["run", *args, "output.name=straight"]).exit_code == 0
    kill_after_round([*args, "output.name=killed"], root / "killed")
    result = CliRunner().invoke(app, ["resume", str(root / "killed")])
    assert result.exit_code == 0, result.output
    adapter = "final_adapter/adapter_model.safetensors"
    assert (root / "killed" / adapter).read_bytes() == (root / "straight" / adapter).read_bytes()

    def strip(path: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in path.read_text().splitlines()]

    assert strip(root / "killed" / "metrics.jsonl") == strip(root / "straight" / "metrics.jsonl")
