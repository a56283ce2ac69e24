"""Memory flatness: peak memory simulating 32 clients vs 2 clients with the same model and data.

Each size runs in a fresh process: bundled SmolLM2-135M, IID split of the built-in tasks, one
round, every client trains one step, with the default runtime (lanes: forked children that share
the base weights). Memory is the peak PSS of the whole process tree, sampled (each shared page
counted once, in shares); RSS summed over the tree is kept alongside. Target: ratio at most 1.15.

    python benchmarks/memory.py [--small 2] [--large 32]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

from common import run_measured, write_result


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
    print(json.dumps({"clients": clients, "trained": len(result.state.history[-1]["clients"])}))


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
        run = run_measured([sys.executable, __file__, "--child", str(n), "--model", args.model])
        if run.returncode != 0:
            raise RuntimeError(f"{n} clients failed:\n{run.output[-3000:]}")
        found = json.loads(run.output.strip().splitlines()[-1])
        assert found["trained"] == n
        runs[n] = {**found, "peak_pss_gb": run.peak_pss / 2**30, "peak_rss_gb_summed": run.peak_rss / 2**30}
    ratio = runs[args.large]["peak_pss_gb"] / runs[args.small]["peak_pss_gb"]
    write_result(
        "memory",
        {
            "setup": {"model": args.model, "runtime": "in_process, runtime.lanes=auto", "memory": "peak PSS, tree"},
            "runs": list(runs.values()),
            "ratio": ratio,
            "target": 1.15,
            "pass": ratio <= 1.15,
        },
    )


if __name__ == "__main__":
    main()
