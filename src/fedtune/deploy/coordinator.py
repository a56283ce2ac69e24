"""``fedtune server CONFIG``: start Flower's SuperLink, enrol client keys, run the experiment, follow it.

The experiment itself runs in Flower's ServerApp process (coordinator_app.py), which the SuperLink
starts; this process supervises: it owns the SuperLink, prints the run's log as it grows, and on
Ctrl-C stops everything, leaving the last complete round checkpointed for ``--resume``. The
SuperLink keeps its state (enrolled keys, node ids) in RUN_DIR/flower/superlink.db, so after a
restart the clients reconnect by themselves under the same ids.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from pathlib import Path

import httpx

from fedtune.config import ExperimentConfig, to_yaml
from fedtune.core.errors import ConfigError, FedtuneError, RunError
from fedtune.deploy.control import Control
from fedtune.deploy.processes import flower_env, port_free, start, stop, superlink_cmd, tail

log = logging.getLogger("fedtune")

REFUSALS = {  # SuperLink log marks of a refused client, and what they mean
    "ApiError:2004": "its key is not enrolled (enrol NAME.pub in runtime.flower.clients and restart the coordinator)",
    "ApiError:2001": "it presented no enrolment key",
}


def enrolled_keys(cfg: ExperimentConfig) -> list[Path]:
    """The NAME.pub files of the enrolled clients, in natural name order (client-2 before client-10)."""
    fl = cfg.runtime.flower
    folder = Path(fl.clients or Path(fl.certs) / "clients")
    keys = sorted(folder.glob("*.pub"), key=lambda p: _natural(p.stem)) if folder.is_dir() else []
    if not keys and not fl.insecure:
        raise ConfigError(
            f"no enrolled client keys (NAME.pub) in {folder} (runtime.flower.clients): create a test federation's "
            f"keys with `fedtune certs {fl.certs} --clients {cfg.partition.num_clients}`"
        )
    return keys


def client_names(cfg: ExperimentConfig) -> list[str]:
    """fedtune client id -> name. Enrolled key names; in insecure mode without keys, client-0, client-1, ..."""
    keys = enrolled_keys(cfg)
    names = [k.stem for k in keys] or [f"client-{i}" for i in range(cfg.partition.num_clients)]
    if len(names) != cfg.partition.num_clients:
        raise ConfigError(
            f"partition.num_clients={cfg.partition.num_clients} but {len(names)} clients are enrolled "
            f"({', '.join(names)}): set partition.num_clients={len(names)}, or enrol the missing ones"
        )
    return names


def check_deployable(cfg: ExperimentConfig) -> None:
    if cfg.compression.downlink_updates:
        raise ConfigError(
            "compression.downlink_updates is simulation-only for now: a lost message would let a deployed "
            "client's adapter drift from the coordinator's replica. Use value codecs on the full downlink instead"
        )
    bound = cfg.aggregation.max_update_norm
    if bound is None:
        raise ConfigError(
            "aggregation.max_update_norm=null: a deployment bounds every update, or one client's reply could "
            "replace the model; use auto (the default: what the configured training can move) or a number"
        )
    if bound == "auto":
        from fedtune.client.schedule import UpdateBound

        _, why = UpdateBound.of(cfg.training, cfg.federation.rounds, 1, cfg.privacy.dp_sgd is not None)
        if why:
            raise ConfigError(
                f"aggregation.max_update_norm=auto cannot bound this training ({why}): set training.max_grad_norm, "
                "or give aggregation.max_update_norm a number"
            )
    fl = cfg.runtime.flower
    if not fl.insecure:
        for name in ("ca.crt", "server.pem", "server.key"):
            if not (Path(fl.certs) / name).is_file():
                raise ConfigError(
                    f"{Path(fl.certs) / name} is missing (runtime.flower.certs): create test certificates with "
                    f"`fedtune certs {fl.certs} --clients {cfg.partition.num_clients}`, or point runtime.flower.certs "
                    "at your own CA's files. Plain text needs an explicit runtime.flower.insecure=true"
                )


def run_coordinator(cfg: ExperimentConfig, config_path: Path | None, resume: bool) -> int:
    """Run the federation to the end; the process exit code (0 done, 1 failed, 130 interrupted)."""
    from fedtune.experiment import check_run_dir, resolve_run_dir
    from fedtune.reporting.console import console

    check_deployable(cfg)
    names = client_names(cfg)
    fl = cfg.runtime.flower
    run_dir = resolve_run_dir(cfg, config_path).resolve()
    check_run_dir(run_dir, cfg, resume)
    flower_dir = run_dir / "flower"
    flower_dir.mkdir(parents=True, exist_ok=True)
    host, port = fl.host_port(listen=True)
    if not port_free(host, port, wait_s=30):
        raise RunError(
            f"{host}:{port} is in use (runtime.flower.listen/address): another coordinator may still be running "
            "there; stop it or choose another port"
        )
    certs = Path(fl.certs).resolve()
    if fl.insecure:
        console.print(
            "[bold yellow]WARNING: runtime.flower.insecure=true: messages travel in plain text and any client can "
            "join. Use this only on one trusted machine.[/]"
        )
    cmd = superlink_cmd(host, port, None if fl.insecure else certs)
    superlink = start(cmd, flower_env(flower_dir / "home"), flower_dir / "superlink.log")
    local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    control = Control(f"{local}:{port}", None if fl.insecure else str(certs / "ca.crt"))
    run_id = None
    try:
        try:
            control.wait_ready(60, alive=lambda: superlink.poll() is None)
        except (httpx.TransportError, httpx.HTTPStatusError) as exc:
            raise RunError(
                f"Flower's SuperLink did not start on {host}:{port} ({exc}). Its log: {flower_dir / 'superlink.log'}"
                + _last_lines(flower_dir / "superlink.log")
            ) from None
        for pub in enrolled_keys(cfg) if not fl.insecure else []:
            name, node_id, new = control.enrol(pub)
            log.info("%s client %s (node %d)", "enrolled" if new else "already enrolled:", name, node_id)
        spec = flower_dir / "spec.json"
        spec.write_text(
            json.dumps(
                {
                    "config": to_yaml(cfg),
                    "config_path": str(config_path) if config_path else None,
                    "cwd": os.getcwd(),
                    "resume": resume,
                    "names": names,
                }
            )
        )
        offset = (run_dir / "run.log").stat().st_size if (run_dir / "run.log").exists() else 0
        run_id = control.submit(flower_dir / "app", spec)
        console.print(
            f"coordinator on {fl.address} ({'plain text' if fl.insecure else 'TLS'}), run {run_id}; "
            f"waiting for {len(names)} clients: {', '.join(names)}"
        )
        status = _follow(control, run_id, run_dir / "run.log", offset, superlink, flower_dir)
    except KeyboardInterrupt:
        if run_id is not None:
            _quietly(lambda: control.stop(run_id))
        console.print(
            f"interrupted; the last complete round is checkpointed: `fedtune server {config_path or 'CONFIG'} --resume`"
        )
        return 130
    finally:
        control.close()
        stop(superlink)
    if status[1] != "completed":
        raise RunError(
            f"the federation's run ended {status[1]}: {status[2] or 'see ' + str(run_dir / 'run.log')}. "
            f"Completed rounds are checkpointed in {run_dir / 'checkpoints'}; fix the cause and rerun with --resume"
        )
    _print_result(run_dir)
    return 0


def _follow(control: Control, run_id: int, run_log: Path, offset: int, superlink, flower_dir: Path) -> tuple:
    """Print the run's log as it grows until the run finishes; its final (status, sub-status, details)."""
    from fedtune.reporting.console import console

    link_offset = 0
    while True:
        lines, offset = tail(run_log, offset)
        for line in lines:
            console.print(_message(line), highlight=False, markup=False)
        link_lines, link_offset = tail(flower_dir / "superlink.log", link_offset)
        for line in link_lines:
            for code, why in REFUSALS.items():
                if code in line:
                    console.print(f"WARNING: refused a client: {why}", highlight=False, markup=False)
        if superlink.poll() is not None:
            raise RunError(
                f"Flower's SuperLink exited (code {superlink.returncode})" + _last_lines(flower_dir / "superlink.log")
            )
        status = control.status(run_id)
        if status[0] == "finished":
            lines, offset = tail(run_log, offset)
            for line in lines:
                console.print(_message(line), highlight=False, markup=False)
            return status
        time.sleep(0.5)


def _message(line: str) -> str:
    """'2026-.. INFO fedtune: text' -> 'text' ('WARNING: text' for warnings and errors)."""
    m = re.match(r"^\S+ \S+ (\w+) [\w.]+: (.*)$", line)
    if not m:
        return line
    return m.group(2) if m.group(1) == "INFO" else f"{m.group(1)}: {m.group(2)}"


def _print_result(run_dir: Path) -> None:
    from fedtune.reporting.console import console, rounds_table, summary_table
    from fedtune.reporting.metrics import read_metrics

    console.print(rounds_table(read_metrics(run_dir / "metrics.jsonl")))
    if (run_dir / "summary.json").is_file():
        console.print(summary_table(json.loads((run_dir / "summary.json").read_text())))


def _last_lines(path: Path, n: int = 8) -> str:
    if not path.is_file():
        return ""
    lines = path.read_text(errors="replace").splitlines()[-n:]
    return "\n  " + "\n  ".join(lines) if lines else ""


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _quietly(fn) -> None:
    with contextlib.suppress(FedtuneError, httpx.HTTPError, OSError):
        fn()
