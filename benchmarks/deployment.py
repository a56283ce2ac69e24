"""Deployment overhead: the same job in-process and as a Flower federation over loopback TLS.

Three clients, each a real `fedtune client` process with its own data file, and a `fedtune
server` coordinator on 127.0.0.1, against `fedtune run` in one process with the same config.
Per round: wall time (request out to last reply in, aggregation and checkpoint included,
evaluation excluded) and the clients' pure local-training time. Both ends ask the SuperLink for
messages (Flower has no push), which with its per-request cost sets a deployed round's floor.

    python benchmarks/deployment.py [--model tiny-llama] [--rounds 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from common import write_result

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.helpers.deployment import Federation  # noqa: E402  (the tests' real-process federation)


def rounds_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]


def summary(history: list[dict]) -> dict:
    later = history[1:]  # round 1 includes each process's first-call warm-up
    return {
        "round_train_s": [round(h["train_s"], 3) for h in history],
        "median_round_s_after_first": round(statistics.median(h["train_s"] for h in later), 3),
        "median_local_train_s_after_first": round(statistics.median(h["local_train_s"] for h in later), 3),
        "bytes_per_round": history[-1]["bytes_up"] + history[-1]["bytes_down"],
        "train_loss": [round(h["train_loss"], 6) for h in history],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    from fedtune.config import load_config
    from fedtune.experiment import run_experiment

    settings = {
        "model": {"name": args.model},
        "federation": {"rounds": args.rounds},
        "training": {"local_steps": args.steps, "batch_size": 8},
        "evaluation": {"every": 0, "at_start": False, "max_samples": 4, "exact_match": False},
    }
    with tempfile.TemporaryDirectory() as tmp:
        fed = Federation(Path(tmp), settings)
        try:
            fed.server()
            for cid in range(3):
                fed.client(cid)
            code = fed.wait_exit("server", 1800)
        finally:
            fed.close()
        if code != 0:
            raise SystemExit(fed.output("server")[-3000:])
        deployed = summary(rounds_of(fed.run_dir))
        cfg = load_config(fed.config, ["runtime.name=in_process", "output.name=in_process"])
        local = summary(rounds_of(run_experiment(cfg).run_dir))
    ratio = deployed["median_round_s_after_first"] / local["median_round_s_after_first"]
    write_result(
        "deployment" if args.model == "tiny-llama" else f"deployment-{args.model}",
        {
            "model": args.model,
            "clients": 3,
            "rounds": args.rounds,
            "local_steps": args.steps,
            "in_process": local,
            "flower_loopback": deployed,
            "round_time_ratio": round(ratio, 2),
            "extra_s_per_round": round(deployed["median_round_s_after_first"] - local["median_round_s_after_first"], 2),
            "same_losses": deployed["train_loss"] == local["train_loss"],
        },
    )


if __name__ == "__main__":
    main()
