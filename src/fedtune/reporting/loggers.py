"""Each round's metrics streamed to TensorBoard and MLflow as the round is recorded (``output.loggers``).

A sink receives the same record ``metrics.jsonl`` gets; every number in it becomes a scalar at step
= round (a nested group, e.g. ``eval_accuracy_by_task``, as ``eval_accuracy_by_task/arithmetic``).
TensorBoard writes to RUN_DIR/tensorboard. MLflow writes to ``MLFLOW_TRACKING_URI`` if set, else to
an SQLite store RUN_DIR/mlflow.db (``mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlflow.db``):
one MLflow run per fedtune run (a resumed run continues it), with the config as its parameters.
Both are optional extras: a sink whose package is missing is an error naming the extra, before the
first round.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Protocol

from fedtune.core.errors import ConfigError
from fedtune.core.files import flatten

_KEY = re.compile(r"[^\w\-. /]")  # what MLflow accepts in a metric name


class Sink(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's numbers by name (nested dicts joined with '/'), without the round itself."""
    flat = flatten(record, "/")
    return {
        k: float(v) for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "round"
    }


class TensorBoardSink:
    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "output.loggers: tensorboard needs its package: pip install 'fedtune[tensorboard]'"
            ) from None
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, global_step=record["round"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MlflowSink:
    def __init__(self, run_dir: Path, name: str, params: dict[str, Any]):
        try:
            import mlflow
        except ImportError:
            raise ConfigError("output.loggers: mlflow needs its package: pip install 'fedtune[mlflow]'") from None
        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri(tracking_uri(run_dir))
        mlflow.set_experiment("fedtune")
        marker = run_dir / "mlflow_run_id"
        if marker.is_file():  # a resumed fedtune run continues its MLflow run
            self.run = mlflow.start_run(run_id=marker.read_text().strip())
        else:
            self.run = mlflow.start_run(run_name=name)
            marker.write_text(self.run.info.run_id)
            flat = {k: str(v)[:500] for k, v in flatten(params).items()}
            for start in range(0, len(flat), 100):  # MLflow takes at most 100 parameters a call
                mlflow.log_params(dict(list(flat.items())[start : start + 100]))

    def log(self, record: dict[str, Any]) -> None:
        values = {_KEY.sub("_", k): v for k, v in scalars(record).items()}
        self.mlflow.log_metrics(values, step=record["round"])

    def close(self) -> None:
        self.mlflow.end_run()


def tracking_uri(run_dir: Path) -> str:
    """The run's own MLflow store: an SQLite file in the run directory."""
    return f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"


def open_sinks(names: list[str], run_dir: Path, name: str, params: dict[str, Any]) -> list[Sink]:
    sinks: list[Sink] = []
    for kind in names:
        sinks.append(TensorBoardSink(run_dir) if kind == "tensorboard" else MlflowSink(run_dir, name, params))
    return sinks
