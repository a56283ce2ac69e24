"""Aggregation throughput: 100 clients x a 20M-parameter adapter, as a ratio to a plain memory copy.

The reference is `torch.Tensor.copy_` of the same bytes (every client's update copied once),
measured in the same run. A ratio of 1.0 means aggregation runs at memcpy speed; the weighted
mean has to read every byte once, so a ratio near 1 is the floor.

    python benchmarks/aggregation_throughput.py [--clients 100] [--params 20000000]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import write_result

from fedtune.aggregation import Contribution, build_aggregator


def _best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--params", type=int, default=20_000_000)
    ap.add_argument("--tensors", type=int, default=160, help="split the adapter into this many tensors")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    per = args.params // args.tensors
    glob = {f"layer{i}.lora_B.weight": torch.zeros(per) for i in range(args.tensors)}
    g = torch.Generator().manual_seed(0)
    deltas = []
    for _ in range(args.clients):
        deltas.append({k: torch.randn(per, generator=g) * 1e-3 for k in glob})
    contribs = [Contribution(i, d, float(1 + i % 7)) for i, d in enumerate(deltas)]
    total_bytes = args.clients * args.params * 4

    sink = {k: torch.empty(per) for k in glob}

    def memcpy() -> None:
        for d in deltas:
            for k, v in d.items():
                sink[k].copy_(v)

    results = {"memcpy_s": _best_of(memcpy, args.repeats)}
    for label, fields in {
        "fedavg": dict(name="fedavg"),
        "fedadam": dict(name="fedadam"),
        "median": dict(combine="median"),
        "trimmed_mean": dict(combine="trimmed_mean", trim_fraction=0.1),
    }.items():
        agg = build_aggregator(**fields)
        state = agg.init(glob)
        reps = args.repeats if label in ("fedavg", "fedadam") else 1
        results[f"{label}_s"] = _best_of(lambda agg=agg, state=state: agg.aggregate(glob, contribs, state), reps)
    ratios = {k.removesuffix("_s"): v / results["memcpy_s"] for k, v in results.items() if k != "memcpy_s"}
    write_result(
        "aggregation_throughput",
        {
            "setup": {
                "clients": args.clients,
                "params": args.params,
                "tensors": args.tensors,
                "bytes_read": total_bytes,
                "repeats": args.repeats,
            },
            "seconds": results,
            "gb_per_s": {k.removesuffix("_s"): total_bytes / v / 1e9 for k, v in results.items()},
            "ratio_to_memcpy": ratios,
            "median_of_ratios": statistics.median(ratios.values()),
        },
    )


if __name__ == "__main__":
    main()
