"""``fedtune client CONFIG --data PATH --key KEY``: join a federation with this machine's own data.

Loads the model once, serves requests in a local worker (local_worker.py), and runs Flower's
SuperNode, which connects to the coordinator over TLS with this client's enrolment key and
reconnects by itself if the coordinator restarts. The client's data never leaves this process;
only adapter updates do. Its state (error-feedback residuals, SCAFFOLD's c_i) lives in --state-dir.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading
import time
from multiprocessing.connection import Listener
from pathlib import Path

from fedtune.config import ExperimentConfig
from fedtune.errors import ConfigError
from fedtune.runtime.flower.local_worker import LocalWorker
from fedtune.runtime.flower.processes import flower_env, free_port, start, stop

log = logging.getLogger("fedtune")

REFUSED = {
    305: "the coordinator refused this client: its key is not enrolled there (or this client is still "
    "listed as online after a crash: it retries for a minute). Ask the coordinator to enrol {pub}",
    303: "runtime.flower.insecure=true cannot be combined with an enrolment key",
}


def run_participant(
    cfg: ExperimentConfig, data: Path, key: Path | None, name: str | None, state_dir: Path | None
) -> int:
    """Serve the federation until the coordinator finishes, this client is stopped, or it is refused."""
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
    state_dir = (state_dir or Path(f"{resolve_run_dir(cfg, None)}.client-{name}")).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger("fedtune")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in (TqdmHandler(), logging.FileHandler(state_dir / "client.log")):
        h.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logger.addHandler(h)
    log.info("client %s: %d examples from %s; state in %s", name, len(examples), data, state_dir)
    worker = LocalWorker(cfg, examples, state_dir)

    sock_dir = tempfile.mkdtemp(prefix="fedtune-client-")  # 0700: only this user reaches the socket
    address, secret = os.path.join(sock_dir, "worker.sock"), os.urandom(32)
    listener = Listener(address, family="AF_UNIX", authkey=secret)
    stopping = threading.Event()
    threading.Thread(target=worker.serve_forever, args=(listener, stopping), daemon=True).start()

    node_config = f"worker='{address}' worker-key='{secret.hex()}' name='{name}'"
    cmd = ["flower-supernode", "--superlink", fl.address, "--node-config", node_config]
    cmd += ["--host", "127.0.0.1", "--port", str(free_port())]
    if fl.insecure:
        console.print("[bold yellow]WARNING: runtime.flower.insecure=true: plain text, no enrolment.[/]")
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(ca.resolve()), "--auth-supernode-private-key", str(key.resolve())]
    supernode = start(cmd, flower_env(state_dir / "flower"), state_dir / "supernode.log")
    log.info("joining the federation at %s (%s) as %s", fl.address, "plain text" if fl.insecure else "TLS", name)

    def _terminate(signum, frame):  # SIGTERM: leave as cleanly as on Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    try:
        while supernode.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        log.info("stopping: leaving the federation")
        return 130
    finally:
        stopping.set()
        stop(supernode)
        listener.close()
    code = supernode.returncode
    if code in REFUSED:
        pub = key.with_suffix(".pub") if key is not None else "its public key"
        log.error(REFUSED[code].format(pub=pub) + f" (SuperNode log: {state_dir / 'supernode.log'})")
        return 2
    if code != 0:
        log.error("the SuperNode exited with code %s; its log: %s", code, state_dir / "supernode.log")
        return 1
    log.info("the federation is over")
    return 0
