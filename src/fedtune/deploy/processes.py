"""Starting and stopping Flower's SuperLink from ``fedtune server``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

IN_MEMORY = ":flwr-in-memory:"  # Flower's own name for its state kept in Python objects, not SQLite


def superlink_cmd(host: str, port: int, certs: Path | None) -> list[str]:
    """flower-superlink with TLS from certs/ (ca.crt, server.pem, server.key) and key enrolment; None: plain.

    It runs behind fedtune's guard (deploy/superlink.py): over the network it serves only the fleet API.
    Its state stays in memory: with SQLite each request cost the SuperLink 30-50 ms of ORM work, most of
    an exchange, and nothing in it outlives a run that fedtune needs (the coordinator enrols the keys at
    each start; clients join again by themselves; the run's own state is in its checkpoints).
    """
    cmd = [sys.executable, "-m", "fedtune.deploy.superlink", "--host", host, "--port", str(port)]
    cmd += ["--database", IN_MEMORY]
    cmd.append("--disable-runtime-dependency-installation")  # the code is the installed fedtune package
    if certs is None:
        return [*cmd, "--insecure"]
    tls = ["--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.pem")]
    return [*cmd, *tls, "--ssl-keyfile", str(certs / "server.key"), "--enable-supernode-auth"]


def flower_env(home: Path) -> dict[str, str]:
    """Environment for Flower processes: this Python's scripts first, a private FLWR_HOME, no telemetry."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FLWR_HOME"] = str(home)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    home.mkdir(parents=True, exist_ok=True)
    return env


def start(cmd: list[str], env: dict[str, str], log_file: Path) -> subprocess.Popen:
    """Start a Flower command (cmd[0]: a path, or a script of this environment), output appended to log_file.

    It gets its own session (our Ctrl-C is ours to handle, then passed on as SIGTERM) and, on
    Linux, SIGTERM when we die, even by SIGKILL: no SuperLink outlives its fedtune command.
    """
    exe = Path(cmd[0]) if Path(cmd[0]).is_absolute() else Path(sys.executable).parent / cmd[0]
    with log_file.open("ab") as out:
        return subprocess.Popen(
            [str(exe) if exe.exists() else cmd[0], *cmd[1:]],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )


def _die_with_parent() -> None:
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def port_free(host: str, port: int, wait_s: float = 0.0) -> bool:
    """Whether host:port can be bound (waiting up to wait_s, e.g. for a previous SuperLink to exit)."""
    import socket
    import time

    deadline = time.monotonic() + wait_s
    while True:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            try:
                s.bind((host or "0.0.0.0", port))
                return True
            except OSError:
                if time.monotonic() >= deadline:
                    return False
        time.sleep(0.5)


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen | None, timeout_s: float = 15.0) -> None:
    """SIGTERM, then SIGKILL if it does not exit."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def tail(path: Path, offset: int) -> tuple[list[str], int]:
    """Complete new lines of a growing text file since byte offset; (lines, new offset)."""
    if not path.is_file():
        return [], offset
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    return data[:end].decode("utf-8", "replace").splitlines(), offset + end
