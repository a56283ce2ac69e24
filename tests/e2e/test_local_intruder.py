"""Another user on a client machine gets nothing while the client trains (real `fedtune server` / `fedtune client`).

The client's process tree may listen on nothing (a Flower SuperNode serves its ClientApps an
unauthenticated API on a loopback port, through which any local user could take the client's task
and answer in its name). A process of another uid then tries what is left: every port and socket
the client listens on, the client's enrolment key, its state directory, and the coordinator's Fleet
API without the key; the run meanwhile completes with every client in every round.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.helpers.deployment import Federation

pytest.importorskip("flwr")
psutil = pytest.importorskip("psutil")

pytestmark = [
    pytest.mark.slow,  # about 40 s on 2 cores
    pytest.mark.skipif(
        not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to run a process as another user"
    ),
]

NOBODY = 65534
# runs as NOBODY with the system's Python: the standard library only
INTRUDER = r"""
import http.client, json, os, socket, ssl, sys
spec = json.loads(sys.argv[1])
got = {}

def attempt(name, fn):
    try:
        got[name] = "GOT: " + repr(fn())[:200]
    except Exception as exc:
        got[name] = "refused: " + type(exc).__name__

def post(host, port, path, tls):
    if tls:
        ctx = ssl.create_default_context(cafile=spec["ca"])
        conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=5)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=5)
    conn.request("POST", path, body=b"", headers={"Content-Type": "application/protobuf"})
    res = conn.getresponse()
    body = res.read()
    if res.status >= 400:
        raise PermissionError(f"HTTP {res.status}")
    return res.status, body[:100]

for port in spec["ports"]:  # what a SuperNode's ClientApp would ask its local Runtime API for: the task
    attempt(f"port {port}", lambda: post("127.0.0.1", port, "/v1/runtime/pull-task-input", False))
for path in spec["unix"]:
    def connect(path=path):
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        s.sendall(b"\x00\x00\x00\x04task")
        return s.recv(100)
    attempt(f"unix {path}", connect)
attempt("key", lambda: open(spec["key"], "rb").read())
attempt("state", lambda: os.listdir(spec["state"]))
attempt("fleet", lambda: post("127.0.0.1", spec["superlink"], "/v1/fleet/pull-messages", True))
print(json.dumps(got))
"""


def _listening(pid: int) -> tuple[list[int], list[str]]:
    """(TCP ports, unix socket paths) the process and its children listen on."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    ports, paths = [], []
    for p in procs:
        for c in p.net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN:
                ports.append(c.laddr.port)
        for c in p.net_connections(kind="unix"):
            if c.laddr:
                paths.append(c.laddr)
    return ports, paths


def test_another_user_on_the_client_machine_can_take_no_task_and_send_no_reply():
    python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
    root = Path(tempfile.mkdtemp(prefix="fedtune-intruder-"))
    os.chmod(root, 0o755)  # reachable by the other user: only fedtune's own modes protect what is inside
    fed = Federation(root, {"partition": {"num_clients": 2}, "federation": {"rounds": 2}})
    try:
        fed.server()
        clients = [fed.client(c, None, None, "--threads", "1") for c in range(2)]
        fed.wait_for("client-0", r"round 1: \w+ request for client")  # it is training
        ports, unix = _listening(clients[0].pid)
        spec = {
            "ports": ports,
            "unix": unix,
            "key": str(root / "certs" / "clients" / "client-0.key"),
            "state": str(root / "runs" / "fed.client-client-0"),
            "ca": str(root / "certs" / "ca.crt"),
            "superlink": fed.port,
        }
        out = subprocess.run(
            [python, "-c", INTRUDER, json.dumps(spec)],
            user=NOBODY,
            group=NOBODY,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        got = json.loads(out.stdout)
        assert fed.wait_exit("server", 300) == 0, fed.output("server")
        rounds = [json.loads(x) for x in (fed.run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    finally:
        fed.close()
        shutil.rmtree(root, ignore_errors=True)
    assert ports == [] and unix == [], f"the client listens locally: ports {ports}, sockets {unix}"
    assert got == {
        "key": "refused: PermissionError",
        "state": "refused: PermissionError",
        "fleet": "refused: PermissionError",  # an HTTP 4xx: requests must be signed with an enrolled key
    }, got
    assert [r["clients"] for r in rounds] == [[0, 1], [0, 1]] and not any(r.get("dropped") for r in rounds)
