"""ServerApp for benchmarks/large_payload.py: one big fedtune message out and back via FlowerRuntime."""

from __future__ import annotations

import hashlib
import json
import resource
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtune.core.types import Envelope
from fedtune.runtime.base import Delivery
from fedtune.runtime.flower_grid import FlowerRuntime

server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    spec = json.loads(Path(str(context.run_config["spec"])).read_text())
    payload = Path(spec["payload"]).read_bytes()
    size, digest = len(payload), hashlib.sha256(payload).digest()
    piece = int(spec["piece_mb"] * 2**20) if spec.get("piece_mb") else None
    runtime = FlowerRuntime(grid, spec["names"], spec["deadline_s"], poll_s=0.1, piece_bytes=piece)
    runtime.wait_for_clients(1, 1, 120)
    t = time.perf_counter()
    outgoing = [Envelope(0, payload)]
    del payload  # handed over, as the round loop hands its requests: the runtime lets it go once delivered
    replies = runtime.send_and_receive(outgoing, Delivery(release=True))
    wall = time.perf_counter() - t
    out = {
        "round_trip_s": wall,
        "echo_identical": len(replies) == 1 and hashlib.sha256(replies[0].payload).digest() == digest,
        "bytes": size,
        "piece_bytes": runtime.piece_bytes,
        "serverapp_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }
    Path(spec["out"]).write_text(json.dumps(out))
