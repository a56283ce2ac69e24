"""Memory flatness: peak RSS simulating 32 clients vs 2 clients with the same model and data.

Each size runs in a fresh process (peak RSS is per process): bundled SmolLM2-135M, IID split of
the built-in tasks, one round, every client trains one step. Target: ratio at most 1.15.

    python benchmarks/memory.py [--small 2] [--large 32]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile

from common import write_result


def child(clients: int, model: str) -> None:
    from fedtune.config import load_config
    from fedtune.experiment import run_experiment

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            "examples/quickstart.yaml",
            [
                f"model.name={model}",
                f"partition.num_clients={clients}",
                "partition.method=iid",
                "federation.rounds=1",
                "training.local_steps=1",
                "evaluation.at_start=false",
                "evaluation.max_samples=4",
                "evaluation.exact_match=false",
                f"output.dir={tmp}",
                "output.progress=false",
            ],
        )
        result = run_experiment(cfg)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: kilobytes
    print(
        json.dumps(
            {"clients": clients, "peak_rss_gb": peak_kb / 1e6, "trained": len(result.state.history[-1]["clients"])}
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", type=int, default=2)
    ap.add_argument("--large", type=int, default=32)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--child", type=int)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.model)
        return
    runs = {}
    for n in (args.small, args.large):
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(n), "--model", args.model],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        runs[n] = json.loads(out.strip().splitlines()[-1])
        assert runs[n]["trained"] == n
    ratio = runs[args.large]["peak_rss_gb"] / runs[args.small]["peak_rss_gb"]
    write_result(
        "memory",
        {
            "setup": {"model": args.model},
            "runs": list(runs.values()),
            "ratio": ratio,
            "target": 1.15,
            "pass": ratio <= 1.15,
        },
    )


if __name__ == "__main__":
    main()
