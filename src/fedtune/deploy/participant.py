"""``fedtune client CONFIG --data PATH --key KEY``: join a federation with this machine's own data.

Loads the model once and serves the coordinator's messages from this one process (node.py over
fleet.py: Flower's Fleet API, TLS, requests signed with this client's enrolment key), joining again
by itself if the coordinator restarts. Nothing listens on this machine. The client's data never
leaves this process; only what its paradigm sends does. Its state (error-feedback residuals,
SCAFFOLD's c_i, a round in progress) lives in --state-dir.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

import torch
import transformers

from fedtune.config import ExperimentConfig
from fedtune.core.errors import ConfigError
from fedtune.deploy.local_worker import LocalWorker

log = logging.getLogger("fedtune")


def run_participant(
    cfg: ExperimentConfig,
    config_path: Path | None,
    data: Path,
    key: Path | None,
    name: str | None,
    state_dir: Path | None,
    refused_retry_s: float = 120.0,
    threads: int | None = None,
) -> int:
    """Serve the federation until this client is stopped or refused for longer than refused_retry_s.

    A refusal is retried for a while: a coordinator may enrol keys after its clients start, and a
    client restarted right after a crash is still listed as online for about a minute.
    """
    from fedtune.data.prepare import load_data_file
    from fedtune.experiment import resolve_run_dir
    from fedtune.reporting.console import TqdmHandler

    fl = cfg.runtime.flower
    ca = Path(fl.certs) / "ca.crt"
    if not fl.insecure:
        if key is None or not key.is_file():
            raise ConfigError(
                f"--key {key or '(not given)'}: give this client's enrolment key (NAME.key from `fedtune certs`); "
                "the coordinator must have enrolled the matching NAME.pub"
            )
        if not ca.is_file():
            raise ConfigError(f"{ca} is missing (runtime.flower.certs): copy the federation's ca.crt there")
    name = name or (key.stem if key is not None else data.stem)
    examples = load_data_file(cfg.data, str(data))
    state_dir = (state_dir or Path(f"{resolve_run_dir(cfg, config_path)}.client-{name}")).resolve()
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(state_dir, 0o700)  # its state, key material of secure rounds and log are this user's alone
    logger = logging.getLogger("fedtune")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in (TqdmHandler(), logging.FileHandler(state_dir / "client.log")):
        h.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logger.addHandler(h)
    flower_log = logging.getLogger("flwr")  # Flower's own messages (retries, heartbeats) go to a file of their own
    for h in list(flower_log.handlers):
        flower_log.removeHandler(h)
    flower_log.addHandler(logging.FileHandler(state_dir / "flower.log"))
    flower_log.propagate = False
    log.info("client %s: %d examples from %s; state in %s", name, len(examples), data, state_dir)
    transformers.utils.logging.disable_progress_bar()
    if threads:
        torch.set_num_threads(threads)  # several clients on one machine: share its cores, do not fight
    worker = LocalWorker(cfg, examples, state_dir)
    return serve_federation(cfg, worker, name, key, refused_retry_s)


def serve_federation(
    cfg: ExperimentConfig, worker: LocalWorker, name: str, key: Path | None, refused_retry_s: float
) -> int:
    """Join the coordinator at runtime.flower.address and answer it until Ctrl-C or SIGTERM (130), or until
    refused for longer than refused_retry_s (2)."""
    from fedtune.deploy.fleet import FleetLink
    from fedtune.deploy.node import run_node
    from fedtune.reporting.console import console
    from fedtune.runtime.polling import Poll

    fl = cfg.runtime.flower
    if fl.insecure:
        console.print("[bold yellow]WARNING: runtime.flower.insecure=true: plain text, no enrolment.[/]")
    ca = None if fl.insecure else (Path(fl.certs) / "ca.crt").resolve()
    link = FleetLink(fl.address, ca, None if fl.insecure else key)
    log.info("joining the federation at %s (%s) as %s", fl.address, "plain text" if fl.insecure else "TLS", name)
    stop = threading.Event()

    def _terminate(signum, frame):  # SIGTERM: leave as cleanly as on Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    direct = None
    if not fl.insecure and fl.direct:
        from fedtune.deploy.direct_link import DirectLoop
        from fedtune.deploy.node import answer_direct

        host = fl.host_port()[0]
        direct = DirectLoop(
            host, ca, link.private_key, link.public_key, lambda m, p: answer_direct(m, p, worker, name), stop
        )
    poll = Poll.of(fl.poll_s, cfg.partition.num_clients)
    try:
        refused = run_node(link, worker, name, poll, stop, refused_retry_s, direct)
    except KeyboardInterrupt:
        log.info("stopping: leaving the federation")
        return 130
    finally:
        stop.set()
        if direct is not None:
            direct.close()
        link.close()
    pub = key.with_suffix(".pub") if key is not None else "its public key"
    log.error(
        "the coordinator refused this client: its key is not enrolled there (or this client is still listed as "
        "online after a crash: it retried for %.0fs). Ask the coordinator to enrol %s (%s)",
        refused_retry_s,
        pub,
        refused,
    )
    return 2
