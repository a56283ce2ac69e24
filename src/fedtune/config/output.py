"""The ``output`` section: where the run directory goes."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fedtune.config.base import Strict


class OutputConfig(Strict):
    """Where the run directory goes."""

    dir: str = Field("runs", description="parent directory of run directories")
    name: str | None = Field(None, description="run directory name; default: the config file's stem")
    keep_checkpoints: int | None = Field(None, ge=1, description="keep the last N round checkpoints (default all)")
    save_adapter_every: int | None = Field(
        None,
        ge=1,
        description="also write the global adapter to RUN_DIR/adapters/round_NNNN every N rounds and after the last "
        "(FlowerTune's train.save-every-round); default: final_adapter/ only",
    )
    progress: bool = Field(True, description="progress bars")
    loggers: list[Literal["tensorboard", "mlflow"]] = Field(
        default_factory=list,
        description="also stream each round's metrics to TensorBoard (RUN_DIR/tensorboard) and/or MLflow "
        "(MLFLOW_TRACKING_URI, else RUN_DIR/mlflow.db); optional extras fedtune[tensorboard], fedtune[mlflow]",
    )
