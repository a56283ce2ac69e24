"""``fedtune client CONFIG --data PATH --key KEY``: join a federation with this machine's own data.

Loads the model once, serves requests in a local worker (local_worker.py), and runs Flower's
SuperNode, which connects to the coordinator over TLS with this client's enrolment key and
reconnects by itself if the coordinator restarts. The client's data never leaves this process;
only adapter updates do. Its state (error-feedback residuals, SCAFFOLD's c_i) lives in --state-dir.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from multiprocessing.connection import Listener
from pathlib import Path

import torch
import transformers

from fedtune.config import ExperimentConfig
from fedtune.core.errors import ConfigError
from fedtune.deploy.local_worker import LocalWorker, worker_secret
from fedtune.deploy.processes import flower_env, start, stop, supernode_cmd, tail

log = logging.getLogger("fedtune")

REFUSED = {
    305: "the coordinator refused this client: its key is not enrolled there (or this client is still "
    "listed as online after a crash: it retries for a minute). Ask the coordinator to enrol {pub}",
    303: "runtime.flower.insecure=true cannot be combined with an enrolment key",
}


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
    from fedtune.data.formats import load_examples
    from fedtune.experiment import resolve_run_dir
    from fedtune.reporting.console import TqdmHandler, console

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
    examples = load_examples(data)
    state_dir = (state_dir or Path(f"{resolve_run_dir(cfg, config_path)}.client-{name}")).resolve()
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(state_dir, 0o700)  # its state, key material of secure rounds and log are this user's alone
    logger = logging.getLogger("fedtune")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in (TqdmHandler(), logging.FileHandler(state_dir / "client.log")):
        h.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logger.addHandler(h)
    log.info("client %s: %d examples from %s; state in %s", name, len(examples), data, state_dir)
    transformers.utils.logging.disable_progress_bar()
    if threads:
        torch.set_num_threads(threads)  # several clients on one machine: share its cores, do not fight
    worker = LocalWorker(cfg, examples, state_dir)

    sock_dir = tempfile.mkdtemp(prefix="fedtune-client-")  # 0700: only this user reaches the socket
    key_file, secret = worker_secret(sock_dir)
    address = os.path.join(sock_dir, "worker.sock")
    listener = Listener(address, family="AF_UNIX")  # the worker authenticates each connection itself
    stopping = threading.Event()
    threading.Thread(target=worker.serve_forever, args=(listener, secret, stopping), daemon=True).start()

    node_config = {"worker": address, "worker-key-file": key_file, "name": name}
    if fl.insecure:
        console.print("[bold yellow]WARNING: runtime.flower.insecure=true: plain text, no enrolment.[/]")
    ca_path, key_path = (None, None) if fl.insecure else (ca.resolve(), key.resolve())
    cmd = supernode_cmd(fl.address, node_config, ca_path, key_path)
    env, node_log = flower_env(state_dir / "flower"), state_dir / "supernode.log"
    log.info("joining the federation at %s (%s) as %s", fl.address, "plain text" if fl.insecure else "TLS", name)

    def _terminate(signum, frame):  # SIGTERM: leave as cleanly as on Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    refused_since = None
    try:
        while True:
            offset = node_log.stat().st_size if node_log.exists() else 0
            supernode = start(cmd, env, node_log)
            seen = offset
            try:
                while supernode.poll() is None:
                    time.sleep(0.5)
                    lines, seen = tail(node_log, seen)
                    for line in lines:
                        if "SuperNode ID:" in line:
                            log.info("connected to the coordinator as node %s", line.rsplit(":", 1)[1].strip())
            finally:
                stop(supernode)
            code = _exit_code(supernode.returncode, node_log, offset)
            if code != 305:
                break
            refused_since = refused_since or time.monotonic()
            pub = key.with_suffix(".pub") if key is not None else "its public key"
            if time.monotonic() - refused_since >= refused_retry_s:
                log.error(REFUSED[code].format(pub=pub) + f" (SuperNode log: {node_log})")
                return 2
            log.warning("the coordinator refused this client (not enrolled yet, or still listed online); retrying")
            time.sleep(2)
    except KeyboardInterrupt:
        log.info("stopping: leaving the federation")
        return 130
    finally:
        stopping.set()
        listener.close()
        shutil.rmtree(sock_dir, ignore_errors=True)  # the socket and its key go with this client
    if code in REFUSED:
        log.error(REFUSED[code].format(pub=key) + f" (SuperNode log: {node_log})")
        return 2
    if code != 0:
        log.error("the SuperNode exited with code %s; its log: %s", code, node_log)
        return 1
    log.info("the SuperNode exited")
    return 0


def _exit_code(returncode: int, node_log: Path, offset: int) -> int:
    """The SuperNode exits 1 but logs why ('Exit Code: 305'); the logged code when there is one."""
    with node_log.open("rb") as f:
        f.seek(offset)
        found = re.findall(r"Exit Code: (\d+)", f.read().decode("utf-8", "replace"))
    return int(found[-1]) if found and returncode != 0 else returncode
