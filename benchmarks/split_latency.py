"""Split learning's latency per exchange over a Flower deployment on loopback (TLS), against in-process.

One client (a real `fedtune client` process) and a `fedtune server` on 127.0.0.1, the tiny 4-block
model, 4 micro-batches a round; the same config in one process. A round of n micro-batches in s
optimizer steps is n + s + 1 exchanges in the U shape (a Forward opens each step, a Back per
micro-batch, then the last gradient) and n + 1 in vanilla (each gradient rides in the next request).
So U with 4 steps of 1 micro-batch is 9 exchanges, U with 1 step of 4 (grad_accum 4) 6, vanilla 5.
The deployment's extra time per round, divided by the round's exchanges, is what one exchange costs
over Flower; times exchanges per micro-batch, what a micro-batch costs in latency.

    python benchmarks/split_latency.py [--rounds 4]
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
ROWS = {  # name -> (shape, grad_accum)
    "u": ("u", 1),
    "u, grad_accum 4": ("u", 4),
    "vanilla": ("vanilla", 1),
}


def exchanges(shape: str, grad_accum: int) -> int:
    steps = MICRO_BATCHES // grad_accum
    return MICRO_BATCHES + (steps if shape == "u" else 0) + 1


def median_round_s(run_dir: Path) -> float:
    return statistics.median(h["train_s"] for h in rounds_of(run_dir)[1:])  # round 1 has the warm-ups


def measure(shape: str, grad_accum: int, rounds: int, tmp: Path) -> dict:
    from fedtune.config import load_config
    from fedtune.experiment import run_experiment

    split = {"name": "split", "shape": shape, **({"client_front": 2} if shape == "vanilla" else {})}
    settings = {
        "paradigm": split,
        "model": {"name": "tiny-llama-deep"},
        "partition": {"method": "iid", "num_clients": 1},
        "federation": {"rounds": rounds},
        "training": {"local_steps": MICRO_BATCHES // grad_accum, "grad_accum": grad_accum, "batch_size": 4},
        "evaluation": {"every": 0, "at_start": False, "max_samples": 4, "exact_match": False},
    }
    fed = Federation(tmp, settings)
    try:
        fed.server()
        fed.client(0)
        code = fed.wait_exit("server", 900)
    finally:
        fed.close()
    if code != 0:
        raise SystemExit(fed.output("server")[-3000:])
    deployed = median_round_s(fed.run_dir)
    cfg = load_config(fed.config, ["runtime.name=in_process", "output.name=in_process"])
    local = median_round_s(run_experiment(cfg).run_dir)
    n = exchanges(shape, grad_accum)
    per_exchange = (deployed - local) / n
    return {
        "grad_accum": grad_accum,
        "exchanges_per_round": n,
        "median_round_s_flower": round(deployed, 3),
        "median_round_s_in_process": round(local, 3),
        "extra_s_per_exchange": round(per_exchange, 3),
        "extra_s_per_micro_batch": round((deployed - local) / MICRO_BATCHES, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    out = {}
    for name, (shape, grad_accum) in ROWS.items():
        with tempfile.TemporaryDirectory() as tmp:
            out[name] = measure(shape, grad_accum, args.rounds, Path(tmp))
            print(name, out[name], flush=True)
    write_result("split_latency", {"model": "tiny-llama-deep", "clients": 1, "micro_batches": MICRO_BATCHES, **out})


if __name__ == "__main__":
    main()
