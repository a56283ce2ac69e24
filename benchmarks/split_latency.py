"""Conversations over a Flower deployment on loopback (TLS): split learning and secure aggregation against one process.

Real `fedtune client` processes and a `fedtune server` on 127.0.0.1, the tiny models, every row's
config also run in one process. A round of n micro-batches in s optimizer steps is n + s + 1
exchanges in the U shape (a Forward opens each step, a Back per micro-batch, then the last
gradient) and n + 1 in vanilla (each gradient rides in the next request); with the shared server
part the sampled clients take turns, so a round is the sum of their conversations. A parameter-
sharing round is one exchange per client (all at once), a secure one four. The deployment's extra
time per round, divided by the round's sequential exchanges, is what one exchange costs over Flower.

    python benchmarks/split_latency.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from common import write_result

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deployment import rounds_of  # noqa: E402

from tests.helpers.deployment import Federation  # noqa: E402  (the tests' real-process federation)

MICRO_BATCHES = 4
EVAL = {"every": 0, "at_start": False, "max_samples": 4, "exact_match": False}
SECURE = {"secure_aggregation": {"threshold": 0.6}}


def split_row(shape: str, grad_accum: int, clients: int = 1, server_part: str = "per_client") -> tuple[dict, int, int]:
    """(settings, clients, sequential exchanges a round) for a split row."""
    split = {"name": "split", "shape": shape, "server_part": server_part}
    if shape == "vanilla":
        split["client_front"] = 2
    settings = {
        "paradigm": split,
        "model": {"name": "tiny-llama-deep"},
        "partition": {"method": "iid", "num_clients": clients},
        "training": {"local_steps": MICRO_BATCHES // grad_accum, "grad_accum": grad_accum, "batch_size": 4},
    }
    steps = MICRO_BATCHES // grad_accum
    per_client = MICRO_BATCHES + (steps if shape == "u" else 0) + 1
    return settings, clients, per_client * (clients if server_part == "shared" else 1)


def sharing_row(secure: bool) -> tuple[dict, int, int]:
    settings = {
        "partition": {"method": "iid", "num_clients": 3},
        "training": {"local_steps": 2, "batch_size": 4},
        **({"privacy": SECURE} if secure else {}),
    }
    return settings, 3, 4 if secure else 1


ROWS = {
    "u": split_row("u", 1),
    "u, grad_accum 4": split_row("u", 4),
    "vanilla": split_row("vanilla", 1),
    "u, shared server part, 2 clients": split_row("u", 1, clients=2, server_part="shared"),
    "parameter sharing, 3 clients": sharing_row(secure=False),
    "secure aggregation, 3 clients": sharing_row(secure=True),
}


def median_round_s(run_dir: Path) -> float:
    return statistics.median(h["train_s"] for h in rounds_of(run_dir)[1:])  # round 1 has the warm-ups


def measure(settings: dict, clients: int, exchanges: int, rounds: int, tmp: Path) -> dict:
    from fedtune.config import load_config
    from fedtune.experiment import run_experiment

    fed = Federation(tmp, {**settings, "federation": {"rounds": rounds}, "evaluation": EVAL})
    try:
        fed.server()
        for c in range(clients):
            fed.client(c, None, None, "--threads", "1")
        code = fed.wait_exit("server", 900)
    finally:
        fed.close()
    if code != 0:
        raise SystemExit(fed.output("server")[-3000:])
    deployed = median_round_s(fed.run_dir)
    overrides = ["runtime.name=in_process", "output.name=in_process"]  # its defaults: lanes, one per core
    local = median_round_s(run_experiment(load_config(fed.config, overrides)).run_dir)
    return {
        "clients": clients,
        "exchanges_per_round": exchanges,
        "median_round_s_flower": round(deployed, 3),
        "median_round_s_in_process": round(local, 3),
        "extra_s_per_round": round(deployed - local, 3),
        "extra_s_per_exchange": round((deployed - local) / exchanges, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", action="append", help="run only these rows (by name); default all")
    args = ap.parse_args()
    out = {}
    for name, (settings, clients, exchanges) in ROWS.items():
        if args.only and name not in args.only:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out[name] = measure(settings, clients, exchanges, args.rounds, Path(tmp))
            print(name, out[name], flush=True)
    plain, secure = out.get("parameter sharing, 3 clients"), out.get("secure aggregation, 3 clients")
    if plain and secure:
        out["secure over plain, deployed"] = round(secure["median_round_s_flower"] - plain["median_round_s_flower"], 3)
    write_result("split_latency", {"model": "tiny-llama(-deep)", "micro_batches": MICRO_BATCHES, **out})


if __name__ == "__main__":
    main()
