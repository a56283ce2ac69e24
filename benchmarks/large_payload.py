"""A fedtune message over 1 GB through a real Flower deployment on loopback (TLS, enrolled key).

The coordinator side is fedtune's FlowerRuntime inside a ServerApp; the client side is fedtune's
real node loop (``deploy.node.run_node`` over ``deploy.fleet.FleetLink``, enrolled key and all, as
`fedtune client` runs it, here in this process) around a worker whose handler echoes the request.
So the bytes cross Flower twice (out and back), through the SuperLink, in pieces of at most
``flower_wire.PIECE_BYTES``. Reports the round-trip time and the peak memory of all processes
together (RSS summed over every process, sampled every 0.1 s), and fails unless the echo is exact.

    python benchmarks/large_payload.py [--gb 1.1] [--runs 5] [--piece-mb 128]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
from common import write_result

HERE = Path(__file__).resolve().parent
SAMPLE_S = 0.1
SUMMED = (
    "peak_rss_gb_all_processes",
    "peak_over_payload",
    "peak_above_footprint_over_payload",
    "peak_anon_rss_gb_all_processes",
    "peak_anon_over_payload",
    "peak_anon_above_footprint_over_payload",
)
FOOTPRINT = ("round_trip_s", "peak_rss_gb_all_processes", "peak_anon_rss_gb_all_processes", "rss_gb_at_peak")


def make_payload(path: Path, gb: float) -> int:
    """A real TrainRequest holding one fp32 tensor of about gb GB, written to path; its size."""
    import torch

    from fedtune.paradigms.parameter_sharing.messages import TrainRequest
    from fedtune.wire.messages import encode_message

    payload = encode_message(TrainRequest(1, {"0.0": torch.rand(int(gb * 1e9) // 4)}))
    path.write_bytes(payload)
    return len(payload)


class RunFailed(Exception):
    pass


def run_once(root: Path, payload: Path, piece_mb: float | None, deadline_s: float) -> dict:
    """One deployment (SuperLink, node loop, worker), one exchange; its measurements. RunFailed unless the
    run completes and the worker saw the request once and the echo came back identical."""
    from fedtune.deploy.certs import write_certs
    from fedtune.deploy.control import Control
    from fedtune.deploy.fleet import FleetLink
    from fedtune.deploy.local_worker import PieceExchanges
    from fedtune.deploy.node import run_node
    from fedtune.deploy.processes import flower_env, free_port, start, stop, superlink_cmd
    from fedtune.runtime.polling import Poll
    from fedtune.wire.serialize import read_header

    certs = root / "certs"
    write_certs(certs, ["127.0.0.1"], ["client-0"])
    spec = root / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "payload": str(payload),
                "names": ["client-0"],
                "out": str(root / "out.json"),
                "piece_mb": piece_mb,
                "deadline_s": deadline_s,
            }
        )
    )
    port = free_port()
    env = flower_env(root / "home")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    link = start(superlink_cmd("127.0.0.1", port, certs), env, root / "link.log")

    seen: list = []

    def echo(cid: int, run: str, request: bytes) -> bytes:
        seen.append((cid, len(request), read_header(request).get("kind")))
        return request

    worker = SimpleNamespace(serve_one=echo, pieces=PieceExchanges(echo))
    stopping = threading.Event()
    control = Control(f"127.0.0.1:{port}", str(certs / "ca.crt"))
    node = None
    peak, at_peak, roles_peak, status = 0, {}, {}, ("unknown", "", "")
    peak_anon, anon_at_peak = 0, {}
    try:
        control.wait_ready(60)
        control.enrol(certs / "clients" / "client-0.pub")
        fleet = FleetLink(f"127.0.0.1:{port}", certs / "ca.crt", certs / "clients" / "client-0.key")
        args = (fleet, worker, "client-0", Poll.up_to(0.05), stopping, 60.0)
        node = threading.Thread(target=run_node, args=args, daemon=True)
        node.start()
        roots = [psutil.Process(os.getpid()), psutil.Process(link.pid)]
        base = sum(rss for rss, _ in _rss_by_role(roots).values())
        t = time.perf_counter()
        run_id = control.submit(root / "app", spec, serverapp="large_payload_app:server_app")
        while status[0] != "finished":
            by_role = _rss_by_role(roots)
            total, anon = (sum(v[i] for v in by_role.values()) for i in (0, 1))
            if total > peak:
                peak, at_peak = total, {k: v[0] for k, v in by_role.items()}
            if anon > peak_anon:
                peak_anon, anon_at_peak = anon, {k: v[1] for k, v in by_role.items()}
            for role, (rss, _) in by_role.items():
                roles_peak[role] = max(roles_peak.get(role, 0), rss)
            time.sleep(SAMPLE_S)
            status = control.status(run_id)
        wall = time.perf_counter() - t
    finally:
        control.close()
        stopping.set()
        if node is not None:
            node.join(60)
        stop(link)
    out = json.loads((root / "out.json").read_text()) if (root / "out.json").exists() else {}
    if status[1] != "completed" or not out.get("echo_identical") or len(seen) != 1:
        logs = f"--- link.log\n{(root / 'link.log').read_text()[-3000:]}"
        raise RunFailed(f"run ended {status}, result {out}, worker saw {seen}\n{logs}")
    gb = 2**30
    return {
        **out,
        "worker_saw": seen[0],
        "submit_to_finished_s": round(wall, 2),
        "throughput_mb_s_both_ways": round(2 * out["bytes"] / 1e6 / out["round_trip_s"], 1),
        "peak_rss_gb_all_processes": round(peak / gb, 2),
        "baseline_rss_gb": round(base / gb, 2),
        "peak_over_payload": round(peak / out["bytes"], 2),
        "rss_gb_at_peak": {k: round(v / gb, 2) for k, v in sorted(at_peak.items())},
        "peak_anon_rss_gb_all_processes": round(peak_anon / gb, 2),
        "peak_anon_over_payload": round(peak_anon / out["bytes"], 2),
        "anon_rss_gb_at_peak": {k: round(v / gb, 2) for k, v in sorted(anon_at_peak.items())},
        "peak_rss_gb_by_process": {k: round(v / gb, 2) for k, v in sorted(roles_peak.items())},
    }


def _role(p: psutil.Process) -> str:
    """Which part of the deployment a process is, from its command line."""
    line = " ".join(p.cmdline())
    if p.pid == os.getpid():
        return "benchmark+client node"
    for needle, role in (
        ("fedtune.deploy.superlink", "superlink"),
        ("flwr-serverapp", "serverapp"),
        ("flower-superexec", "superexec"),
    ):
        if needle in line:
            return role
    return "other"


def _rss_by_role(roots: list[psutil.Process]) -> dict[str, tuple[int, int]]:
    """(RSS, anonymous RSS) summed by role over roots and all their descendants, each process once.

    RSS counts shared libraries once per process; the
    anonymous part (RSS minus file-backed and shared pages) is the memory the processes hold."""
    out: dict[str, tuple[int, int]] = {}
    seen: set[int] = set()
    for r in roots:
        try:
            procs = [r, *r.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for p in procs:
            if p.pid in seen:
                continue
            seen.add(p.pid)
            try:
                role, mem = _role(p), p.memory_info()
            except psutil.NoSuchProcess:  # a process that just finished
                continue
            rss, anon = out.get(role, (0, 0))
            out[role] = (rss + mem.rss, anon + mem.rss - mem.shared)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.1)
    ap.add_argument("--runs", type=int, default=1, help="fresh deployments, one exchange each; all must pass")
    ap.add_argument("--piece-mb", type=float, default=None, help="default: flower_wire.PIECE_BYTES (128 MiB)")
    ap.add_argument("--deadline-s", type=float, default=1800.0, help="the exchange's deadline")
    ap.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it (logs, database)")
    args = ap.parse_args()
    runs = []
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    with contextlib.nullcontext(str(args.keep)) if args.keep else tempfile.TemporaryDirectory() as tmp:
        small, payload = Path(tmp) / "small.bin", Path(tmp) / "payload.bin"
        make_payload(small, 1e-3)  # the same deployment moving 1 MB: what every process holds anyway
        (Path(tmp) / "footprint").mkdir()
        footprint = run_once(Path(tmp) / "footprint", small, args.piece_mb, args.deadline_s)
        size = make_payload(payload, args.gb)
        for i in range(args.runs):
            root = Path(tmp) / f"run-{i}"
            root.mkdir()
            try:
                runs.append(run_once(root, payload, args.piece_mb, args.deadline_s))
                for kind in ("", "anon_"):
                    above = runs[-1][f"peak_{kind}rss_gb_all_processes"] - footprint[f"peak_{kind}rss_gb_all_processes"]
                    runs[-1][f"peak_{kind}above_footprint_over_payload"] = round(above * 2**30 / size, 2)
            except RunFailed as exc:
                runs.append({"failed": str(exc)})
            print(f"run {i + 1}/{args.runs}: {json.dumps(runs[-1])}", flush=True)
    ok = [r for r in runs if "failed" not in r]
    trips = [r["round_trip_s"] for r in ok] or [float("nan")]
    write_result(
        f"large_payload_{args.gb:g}gb" + (f"_{args.piece_mb:g}mib_pieces" if args.piece_mb else ""),
        {
            "gb": round(size / 1e9, 3),
            "bytes": size,
            "runs_passed": f"{len(ok)} of {args.runs}",
            "piece_bytes": ok[0]["piece_bytes"] if ok else None,
            "round_trip_s_median": round(statistics.median(trips), 1),
            "round_trip_s_range": [round(min(trips), 1), round(max(trips), 1)],
            **{f"{k}_max": max((r[k] for r in ok), default=None) for k in SUMMED},
            "footprint_1mb": {k: footprint[k] for k in FOOTPRINT},
            "flwr": __import__("flwr").__version__,
            "runs": runs,
        },
    )
    if len(ok) < len(runs):
        raise SystemExit(f"FAILED: {len(runs) - len(ok)} of {len(runs)} runs did not echo the message exactly")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
