"""The coordinator's side of Flower's Control API: enrol client keys, submit a run, watch it.

Flower 1.41 has no public Python API for these; this module wraps the calls its own ``flwr``
CLI makes (checked against flwr 1.41), so fedtune needs no ``flwr`` subprocess or config file.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import httpx
from cryptography.hazmat.primitives import serialization
from flwr.cli.build import build_fab_from_disk
from flwr.cli.typing import SuperLinkConnection
from flwr.cli.utils import init_http_client_from_connection
from flwr.common.config import parse_config_args
from flwr.common.serde import fab_to_proto, user_config_to_proto
from flwr.proto.control_pb2 import (  # pylint: disable=no-name-in-module
    ListNodesRequest,
    ListRunsRequest,
    RegisterNodeRequest,
    StartRunRequest,
    StopRunRequest,
)
from flwr.supercore.fab import Fab
from flwr.supercore.primitives.asymmetric import public_key_to_bytes

SERVER_APP = "fedtune.deploy.app:server_app"
CLIENT_APP = "fedtune.deploy.app:client_app"
APP_TOML = """[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "fedtune-federation"
version = "1.0.0"
description = "fedtune's ServerApp and ClientApp (the code is the installed fedtune package)"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedtune"

[tool.flwr.app.components]
serverapp = "{serverapp}"
clientapp = "{clientapp}"

[tool.flwr.app.config]
spec = ""
"""  # the app's code is the installed package: the FAB carries only this file


class Control:
    """A connection to a SuperLink's Control API."""

    def __init__(self, address: str, ca: str | None):
        conn = SuperLinkConnection(name="fedtune", address=address, root_certificates=ca, insecure=ca is None)
        self.client = init_http_client_from_connection(conn)

    def close(self) -> None:
        self.client.close()

    def wait_ready(self, timeout_s: float, alive=lambda: True) -> None:
        """Until the SuperLink answers (it takes a few seconds to start)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.client.ListNodes(ListNodesRequest())
                return
            except (httpx.TransportError, httpx.HTTPStatusError):
                if time.monotonic() > deadline or not alive():
                    raise
                time.sleep(0.3)

    def enrolled(self) -> dict[bytes, tuple[str, int]]:
        """Public key bytes -> (name, node id) of every registered node."""
        res = self.client.ListNodes(ListNodesRequest())
        return {n.public_key: (n.name, n.node_id) for n in res.nodes_info if not n.unregistered_at}

    def enrol(self, pub_file: Path) -> tuple[str, int, bool]:
        """Register the key in NAME.pub under NAME; (name, node id, newly registered)."""
        key = serialization.load_ssh_public_key(pub_file.read_bytes())
        raw = public_key_to_bytes(key)
        known = self.enrolled()
        if raw in known:
            return known[raw][0], known[raw][1], False
        res = self.client.RegisterNode(RegisterNodeRequest(public_key=raw, name=pub_file.stem))
        return pub_file.stem, res.node_id, True

    def submit(self, app_dir: Path, spec: Path, serverapp: str = SERVER_APP, clientapp: str = CLIENT_APP) -> int:
        """Start a run of the given apps (importable where the SuperLink and SuperNodes run); its id."""
        app_dir.mkdir(parents=True, exist_ok=True)
        (app_dir / "pyproject.toml").write_text(APP_TOML.format(serverapp=serverapp, clientapp=clientapp))
        fab_bytes = build_fab_from_disk(app_dir)
        fab = Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
        override = user_config_to_proto(parse_config_args([f"spec='{spec}'"]))
        res = self.client.StartRun(
            StartRunRequest(fab=fab_to_proto(fab), override_config=override, federation="", app_spec="")
        )
        if not res.HasField("run_id"):
            raise RuntimeError(f"the SuperLink did not start the run: {res}")
        return res.run_id

    def status(self, run_id: int) -> tuple[str, str, str]:
        """(status, sub-status, details): e.g. ('finished', 'failed', 'the exception text').

        ('unknown', '', why) while the SuperLink is unreachable or busy (it answers 500 while
        its database is locked by a large transfer): callers poll again.
        """
        try:
            run = self.client.ListRuns(ListRunsRequest(run_id=run_id)).run_dict[run_id]
        except httpx.TransportError as exc:
            return "unknown", "", str(exc)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code < 500:
                raise
            return "unknown", "", str(exc)
        return run.status.status, run.status.sub_status, run.status.details

    def stop(self, run_id: int) -> None:
        self.client.StopRun(StopRunRequest(run_id=run_id))
