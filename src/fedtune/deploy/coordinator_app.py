"""What runs inside Flower's ServerApp process: the ordinary experiment, with the Grid as runtime."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import yaml
from flwr.serverapp import Grid

from fedtune.config import ExperimentConfig, validate_config
from fedtune.runtime.direct_grid import DirectGrid
from fedtune.runtime.direct_hub import Hub, enrolled_keys
from fedtune.runtime.direct_wire import META_MAX
from fedtune.runtime.flower_grid import FlowerRuntime
from fedtune.runtime.polling import Poll

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


def run_id(run_dir: Path, resume: bool) -> str:
    """The run's id, which clients key their state by: new for a new run, the stored one when resuming
    (RUN_DIR/flower/run-id, created owner-only)."""
    from fedtune.runtime.flower_wire import checked_run, new_run_id

    path = run_dir / "flower" / "run-id"
    if resume and path.is_file():
        return checked_run(path.read_text().strip())
    path.parent.mkdir(parents=True, exist_ok=True)
    value = new_run_id()
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)
    os.replace(tmp, path)
    return value


def serve(grid: Grid, spec_path: str) -> None:
    """Run the experiment that ``fedtune server`` described in spec_path."""
    spec = json.loads(Path(spec_path).read_text())
    os.chdir(spec["cwd"])  # relative paths in the config mean what they meant to `fedtune server`
    cfg = validate_config(yaml.safe_load(spec["config"]), spec["config_path"] or "config")
    from fedtune.experiment import resolve_run_dir, run_experiment

    fl = cfg.runtime.flower
    config_path = Path(spec["config_path"]) if spec["config_path"] else None
    run = run_id(resolve_run_dir(cfg, config_path), spec["resume"])
    poll_s = Poll.of(fl.poll_s, 1).busy  # one asker, whatever the number of clients
    hub = direct_hub(cfg) if fl.direct and not fl.insecure else None
    routed = grid if hub is None else DirectGrid(grid, hub)
    runtime = FlowerRuntime(routed, spec["names"], reply_deadline(cfg), poll_s, insecure=fl.insecure, run_id=run)
    try:
        runtime.wait_for_clients(len(spec["names"]), cfg.federation.min_clients, fl.join_timeout_s)
        run_experiment(cfg, config_path, resume=spec["resume"], runtime=runtime)
    finally:
        if hub is not None:
            hub.stop()


def direct_hub(cfg: ExperimentConfig) -> Hub | None:
    """The direct channel, listening with the coordinator's certificate for the enrolled clients' keys; None
    (said why) where it cannot listen: the run then goes through Flower alone."""
    from fedtune.runtime.flower_wire import default_piece_bytes

    fl = cfg.runtime.flower
    certs = Path(fl.certs)
    host, port = fl.host_port(listen=True)
    port = port + 1 if fl.direct_port is None else fl.direct_port
    hub = Hub(enrolled_keys(Path(fl.clients or certs / "clients")), default_piece_bytes() + META_MAX + 16)
    try:
        bound = hub.start(host, port, certs / "server.pem", certs / "server.key")
    except (OSError, RuntimeError) as exc:
        log.warning(
            "the direct channel cannot listen on %s:%d (%s): every exchange goes through the SuperLink, slower; "
            "free the port or set runtime.flower.direct_port",
            host,
            port,
            exc,
        )
        hub.stop()
        return None
    log.info("direct channel listening on %s:%d", host, bound)
    return hub
