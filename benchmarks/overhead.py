"""Framework overhead: wall time of a round / sum of the clients' pure local-training time.

Bundled SmolLM2-135M, LoRA r=8 on q,k,v,o, 4 clients x 3 local steps of batch 8 per round.
A round's wall time runs from one round's metrics record to the next, so it includes sampling,
encoding, decoding, validation, aggregation, the atomic checkpoint and the metrics write.
Evaluation runs only after the last round, which is left out. Target: at most 1.05.

    python benchmarks/overhead.py [--rounds 5] [--clients 4]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time

from common import write_result

from fedtune.config import load_config
from fedtune.experiment import run_experiment


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()
    stamps: list[tuple[float, dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            "examples/quickstart.yaml",
            [
                f"model.name={args.model}",
                f"partition.num_clients={args.clients}",
                "partition.method=iid",
                f"federation.rounds={args.rounds}",
                f"training.local_steps={args.steps}",
                "evaluation.every=0",
                "evaluation.at_start=false",
                "evaluation.max_samples=4",
                "evaluation.exact_match=false",
                f"output.dir={tmp}",
                "output.progress=false",
            ],
        )
        run_experiment(cfg, on_record=lambda rec: stamps.append((time.perf_counter(), rec)))
    rows = []
    for (t0, _), (t1, rec) in itertools.pairwise(stamps):
        if rec["round"] == args.rounds:  # the last round also evaluates; not framework overhead
            continue
        rows.append(
            {
                "round": rec["round"],
                "round_wall_s": t1 - t0,
                "local_train_s": rec["local_train_s"],
                "ratio": (t1 - t0) / rec["local_train_s"],
            }
        )
    wall, local = sum(r["round_wall_s"] for r in rows), sum(r["local_train_s"] for r in rows)
    write_result(
        "overhead",
        {
            "setup": {
                "model": args.model,
                "clients": args.clients,
                "local_steps": args.steps,
                "batch_size": 8,
                "rounds_measured": len(rows),
            },
            "rounds": rows,
            "ratio": wall / local,
            "overhead_s_per_round": (wall - local) / len(rows),
            "target": 1.05,
            "pass": wall / local <= 1.05,
        },
    )


if __name__ == "__main__":
    main()
