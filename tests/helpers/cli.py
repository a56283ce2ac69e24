"""The real CLI, in this process: a command's exit code and output, a tiny run, a run's metrics."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from fedtune.cli import app
from tests.helpers.configs import TINY_OVERRIDES

runner = CliRunner()


def cli(*args: str) -> tuple[int, str]:
    """``fedtune ARGS``: (exit code, what it printed, with an unexpected exception's text)."""
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output + (
        str(result.exception) if result.exception and result.exit_code != 2 else ""
    )


def run_tiny(tmp_path: Path, *extra: str, name: str = "tiny") -> tuple[int, str]:
    """``fedtune run examples/tiny.yaml`` with TINY_OVERRIDES and ``extra``, into tmp_path/name."""
    return cli("run", "examples/tiny.yaml", *TINY_OVERRIDES, f"output.dir={tmp_path}", f"output.name={name}", *extra)


def read_metrics(run_dir: Path) -> list[dict]:
    """A run directory's metrics.jsonl, one record per round."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
