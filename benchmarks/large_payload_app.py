"""ServerApp for benchmarks/large_payload.py: one big fedtune message out and back via FlowerRuntime."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtune.runtime.flower_grid import FlowerRuntime
from fedtune.types import Envelope

server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    spec = json.loads(Path(str(context.run_config["spec"])).read_text())
    payload = Path(spec["payload"]).read_bytes()
    runtime = FlowerRuntime(grid, spec["names"], poll_s=0.1)
    runtime.wait_for_clients(1, 1, 120)
    t = time.perf_counter()
    replies = runtime.send_and_receive([Envelope(0, payload)])
    wall = time.perf_counter() - t
    ok = len(replies) == 1 and hashlib.sha256(replies[0].payload).digest() == hashlib.sha256(payload).digest()
    Path(spec["out"]).write_text(json.dumps({"round_trip_s": wall, "echo_identical": ok, "bytes": len(payload)}))
