"""A fedtune message over 1 GB through a real Flower deployment on loopback (TLS, enrolled key).

The coordinator side is fedtune's FlowerRuntime inside a ServerApp; the client side is fedtune's
real ClientApp, which hands the bytes to a local worker over the same socket protocol
`fedtune client` uses; here the worker checks the message and echoes it back. So the bytes
cross Flower twice (out and back), through the SuperLink's database. Reports the round-trip
time and the peak memory of all processes together.

    python benchmarks/large_payload.py [--gb 1.1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Listener
from pathlib import Path

import psutil
import torch
from common import write_result

HERE = Path(__file__).resolve().parent


def echo_worker(listener: Listener, seen: list) -> None:
    from fedtune.wire.serialize import read_header

    with listener.accept() as conn:
        _op, cid = conn.recv()
        payload = conn.recv_bytes()
        seen.append((cid, len(payload), read_header(payload).get("kind")))
        conn.send(("ok", None))
        conn.send_bytes(payload)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.1)
    args = ap.parse_args()
    from fedtune.deploy.certs import write_certs
    from fedtune.deploy.control import Control
    from fedtune.deploy.processes import flower_env, free_port, start, stop, superlink_cmd, supernode_cmd
    from fedtune.paradigms.parameter_sharing.messages import TrainRequest
    from fedtune.wire.messages import encode_message

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        certs = root / "certs"
        write_certs(certs, ["127.0.0.1"], ["client-0"])
        n = int(args.gb * 1e9) // 4
        payload = encode_message(TrainRequest(1, {"0.0": torch.rand(n)}))  # one fp32 tensor: a real request
        (root / "payload.bin").write_bytes(payload)
        del payload
        spec = root / "spec.json"
        spec.write_text(
            json.dumps({"payload": str(root / "payload.bin"), "names": ["client-0"], "out": str(root / "out.json")})
        )

        port = free_port()
        env = flower_env(root / "home")
        env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
        link = start(superlink_cmd("127.0.0.1", port, root / "link.db", certs), env, root / "link.log")
        secret, sock = os.urandom(32), str(root / "worker.sock")
        listener = Listener(sock, family="AF_UNIX", authkey=secret)
        seen: list = []
        threading.Thread(target=echo_worker, args=(listener, seen), daemon=True).start()
        control = Control(f"127.0.0.1:{port}", str(certs / "ca.crt"))
        node = None
        peak, procs = 0, []
        try:
            control.wait_ready(60)
            control.enrol(certs / "clients" / "client-0.pub")
            node_config = {"worker": sock, "worker-key": secret.hex(), "name": "client-0"}
            key = certs / "clients" / "client-0.key"
            cmd = supernode_cmd(f"127.0.0.1:{port}", node_config, certs / "ca.crt", key)
            node = start(cmd, flower_env(root / "node"), root / "node.log")
            t = time.perf_counter()
            run_id = control.submit(root / "app", spec, serverapp="large_payload_app:server_app")
            procs = [psutil.Process(os.getpid()), psutil.Process(link.pid), psutil.Process(node.pid)]
            base = _tree_rss(procs)
            while control.status(run_id)[0] != "finished":
                peak = max(peak, _tree_rss(procs))
                time.sleep(0.2)
            status = control.status(run_id)
            total = time.perf_counter() - t
        finally:
            control.close()
            stop(node)
            stop(link)
            listener.close()
        if status[1] != "completed" or not (root / "out.json").exists():
            raise SystemExit(f"run ended {status}: {(root / 'link.log').read_text()[-3000:]}")
        out = json.loads((root / "out.json").read_text())
    write_result(
        "large_payload",
        {
            **out,
            "gb": round(out["bytes"] / 1e9, 3),
            "worker_saw": seen[0] if seen else None,
            "submit_to_finished_s": round(total, 2),
            "throughput_mb_s_both_ways": round(2 * out["bytes"] / 1e6 / out["round_trip_s"], 1),
            "peak_rss_gb_all_processes": round(peak / 2**30, 2),
            "baseline_rss_gb": round(base / 2**30, 2),
            "flwr": __import__("flwr").__version__,
        },
    )


def _tree_rss(roots: list[psutil.Process]) -> int:
    total, seen = 0, set()
    for r in roots:
        try:
            for p in [r, *r.children(recursive=True)]:
                if p.pid not in seen:
                    seen.add(p.pid)
                    total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
