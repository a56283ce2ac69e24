"""Aggregation algorithms side by side on the built-in non-IID tasks with the bundled model.

Each row is one federated run from the quickstart config, shortened to fit the whole table in
about 15 minutes on 2 CPU cores: 4 clients (one task family each), 3 rounds of 4 local steps,
evaluation of the final global adapter on the 40 held-out problems. The base model (round 0,
identical for every row) is evaluated once.

    python benchmarks/algorithms.py [--rounds 3] [--steps 4] [--only fedavg_exact,fedadam]

With --only, the chosen rows replace their namesakes in results/algorithms.json and the rest are kept.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from common import merge_rows, quickstart_setup, write_result

from fedtune.config import load_config
from fedtune.experiment import run_experiment

ALGORITHMS: dict[str, list[str]] = {
    "fedavg_exact": ["aggregation.lora=exact"],
    "fedavg_naive": ["aggregation.lora=naive"],
    "fedavg_ffa": ["aggregation.lora=ffa"],
    "fedavgm": ["aggregation.name=fedavgm", "aggregation.momentum=0.5"],
    "fedadam": ["aggregation.name=fedadam"],
    "fedyogi": ["aggregation.name=fedyogi"],
    "fedprox": ["training.proximal_mu=0.01"],
    "scaffold": ["aggregation.scaffold=true"],
    "median": ["aggregation.combine=median"],
    "hetero_ranks_flexlora": ["adapter.client_ranks=[2,4,8,8]"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(ALGORITHMS))
    args = ap.parse_args()
    chosen = [a for a in ALGORITHMS if not args.only or a in args.only.split(",")]
    common = [
        f"federation.rounds={args.rounds}",
        f"training.local_steps={args.steps}",
        "evaluation.every=0",
        "output.progress=false",
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = run_experiment(
            load_config(
                "examples/quickstart.yaml",
                [*common, "federation.rounds=1", "training.local_steps=1", f"output.dir={tmp}", "output.name=base"],
            )
        )
        start = base.state.history[0]
        for name in chosen:
            t = time.perf_counter()
            cfg = load_config(
                "examples/quickstart.yaml",
                [*common, "evaluation.at_start=false", *ALGORITHMS[name], f"output.dir={tmp}", f"output.name={name}"],
            )
            result = run_experiment(cfg)
            hist = [h for h in result.state.history if h["round"] > 0]
            last = hist[-1]
            rows.append(
                {
                    "algorithm": name,
                    "overrides": ALGORITHMS[name],
                    "final_eval_loss": last["eval_loss"],
                    "final_accuracy": last["eval_accuracy"],
                    "accuracy_by_task": last.get("eval_accuracy_by_task"),
                    "bytes_up_per_round": sum(h["bytes_up"] for h in hist) / len(hist),
                    "bytes_down_per_round": sum(h["bytes_down"] for h in hist) / len(hist),
                    "lora_error_last_round": last.get("lora_truncation_error", last.get("lora_factor_averaging_error")),
                    "wall_s": time.perf_counter() - t,
                }
            )
            print(rows[-1], flush=True)
    if args.only:  # keep the rows that were not re-run
        rows = merge_rows("algorithms", rows, "algorithm", list(ALGORITHMS))
    write_result(
        "algorithms",
        {
            "setup": quickstart_setup(args.rounds, args.steps),
            "base_model": {"eval_loss": start["eval_loss"], "accuracy": start["eval_accuracy"]},
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
