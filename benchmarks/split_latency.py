"""Split learning's latency per exchange over a Flower deployment on loopback (TLS), against in-process.

One client (a real `fedtune client` process) and a `fedtune server` on 127.0.0.1, the tiny 4-block
model, 4 micro-batches a round; the same config in one process. A round of the U shape is
2 x 4 + 1 = 9 exchanges (Forward and Back per micro-batch, then the last gradient), of vanilla
4 + 1 = 5 (each gradient rides in the next request). The deployment's extra time per round, divided
by the round's exchanges, is what one exchange costs over Flower: what one micro-batch costs in
latency is that times 2 (U) or 1 (vanilla).

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

from tests.e2e.federation import Federation  # noqa: E402  (the tests' real-process federation)

MICRO_BATCHES = 4
EXCHANGES = {"u": 2 * MICRO_BATCHES + 1, "vanilla": MICRO_BATCHES + 1}


def median_round_s(run_dir: Path) -> float:
    return statistics.median(h["train_s"] for h in rounds_of(run_dir)[1:])  # round 1 has the warm-ups


def measure(shape: str, rounds: int, tmp: Path) -> dict:
    from fedtune.config import load_config
    from fedtune.experiment import run_experiment

    split = {"shape": shape, **({"client_front": 2} if shape == "vanilla" else {})}
    settings = {
        "paradigm": "split",
        "split": split,
        "model": {"name": "tiny-llama-deep"},
        "partition": {"method": "iid", "num_clients": 1},
        "federation": {"rounds": rounds},
        "training": {"local_steps": MICRO_BATCHES, "batch_size": 4},
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
    per_exchange = (deployed - local) / EXCHANGES[shape]
    return {
        "exchanges_per_round": EXCHANGES[shape],
        "median_round_s_flower": round(deployed, 3),
        "median_round_s_in_process": round(local, 3),
        "extra_s_per_exchange": round(per_exchange, 3),
        "extra_s_per_micro_batch": round(per_exchange * (2 if shape == "u" else 1), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    out = {}
    for shape in ("u", "vanilla"):
        with tempfile.TemporaryDirectory() as tmp:
            out[shape] = measure(shape, args.rounds, Path(tmp))
            print(shape, out[shape], flush=True)
    write_result("split_latency", {"model": "tiny-llama-deep", "clients": 1, "micro_batches": MICRO_BATCHES, **out})


if __name__ == "__main__":
    main()
