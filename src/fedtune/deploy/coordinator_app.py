"""What runs inside Flower's ServerApp process: the ordinary experiment, with the Grid as runtime."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import yaml
from flwr.serverapp import Grid

from fedtune.config import ExperimentConfig, validate_config
from fedtune.runtime.flower_grid import FlowerRuntime

log = logging.getLogger("fedtune")
DEFAULT_DEADLINE_S = 3600.0  # without one, Flower would keep a request (and the round) open for 12 h


def reply_deadline(cfg: ExperimentConfig) -> float:
    """Seconds a deployed round waits for replies: federation.round_timeout_s, else DEFAULT_DEADLINE_S."""
    if cfg.federation.round_timeout_s is not None:
        return cfg.federation.round_timeout_s
    log.info(
        "federation.round_timeout_s is not set: a client that has not replied %.0f s after a request is dropped "
        "for that round; set it to fit your rounds",
        DEFAULT_DEADLINE_S,
    )
    return DEFAULT_DEADLINE_S


def serve(grid: Grid, spec_path: str) -> None:
    """Run the experiment that ``fedtune server`` described in spec_path."""
    spec = json.loads(Path(spec_path).read_text())
    os.chdir(spec["cwd"])  # relative paths in the config mean what they meant to `fedtune server`
    cfg = validate_config(yaml.safe_load(spec["config"]), spec["config_path"] or "config")
    from fedtune.experiment import run_experiment

    fl = cfg.runtime.flower
    runtime = FlowerRuntime(grid, spec["names"], reply_deadline(cfg), insecure=fl.insecure)
    runtime.wait_for_clients(len(spec["names"]), cfg.federation.min_clients, fl.join_timeout_s)
    config_path = Path(spec["config_path"]) if spec["config_path"] else None
    run_experiment(cfg, config_path, resume=spec["resume"], runtime=runtime)
