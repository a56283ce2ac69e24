"""Framework overhead: wall time of a round / the clients' pure local-training time.

Bundled SmolLM2-135M, LoRA r=8 on q,k,v,o, 4 clients x 3 local steps of batch 8 per round.
A round's wall time runs from one round's metrics record to the next, so it includes sampling,
encoding, decoding, validation, aggregation, the atomic checkpoint and the metrics write.
Evaluation runs only after the last round, which is left out. Target: at most 1.05.

Two runs of the same job: clients served in turn (``runtime.lanes=1``), where the ratio's
denominator is the clients' summed training time; and the default lanes, where clients train side
by side, so the denominator is the round's time in the clients' hands (``clients_s``: until the
last lane's reply; lane forking, pickling and pipes fall inside it, and show in the lanes' speedup).

The guards a reply passes on the server (the header's types, the codec meta's declared shapes,
the finite and norm checks of each update, the reported numbers and weight, the aggregate's
finite check; ``aggregation.max_update_norm`` is set, far above any update, so that its check
runs) are timed in place; their share of the round's framework overhead (wall time minus local
training) is reported. Target: under 1%.

    python benchmarks/overhead.py [--rounds 5] [--clients 4]
"""

from __future__ import annotations

import argparse
import functools
import importlib
import itertools
import tempfile
import time
from collections.abc import Callable

from common import write_result

from fedtune.config import load_config
from fedtune.experiment import run_experiment

GUARDS = [  # (module, function) as the code that runs them looks them up
    ("fedtune.wire.messages", "_check_header"),
    ("fedtune.codecs.base", "check_declared_shapes"),
    ("fedtune.paradigms.parameter_sharing.server", "check_update"),
    ("fedtune.paradigms.parameter_sharing.server", "check_numbers"),
    ("fedtune.paradigms.parameter_sharing.server", "weight_or_drop"),
    ("fedtune.server.round_loop", "_check_finite"),
]


def time_guards() -> dict[str, float]:
    """Wrap every guard with a timer; the returned dict accumulates seconds per guard."""
    spent: dict[str, float] = {}

    def timed(name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - start

        return run

    for module, name in GUARDS:
        mod = importlib.import_module(module)
        setattr(mod, name, timed(name, getattr(mod, name)))
    return spent


def run(args, lanes: str) -> dict:
    """One run; per measured round its wall time, the clients' time and the guards' share of the overhead."""
    stamps: list[tuple[float, dict, float]] = []  # (time, record, guard seconds so far)
    guards = time_guards()
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
                "aggregation.max_update_norm=1000",
                f"runtime.lanes={lanes}",
            ],
        )
        run_experiment(cfg, on_record=lambda rec: stamps.append((time.perf_counter(), rec, sum(guards.values()))))
    # in turn, the clients' summed training is the round's critical path; side by side, their time in the runtime
    key = "local_train_s" if lanes == "1" else "clients_s"
    rows = []
    for (t0, _, g0), (t1, rec, g1) in itertools.pairwise(stamps):
        if rec["round"] == args.rounds:  # the last round also evaluates; not framework overhead
            continue
        clients = rec[key]
        rows.append(
            {
                "round": rec["round"],
                "round_wall_s": t1 - t0,
                "local_train_s": rec["local_train_s"],
                "clients_s": rec["clients_s"],
                "ratio": (t1 - t0) / clients,
                "guards_s": g1 - g0,
                "guards_share_of_overhead": (g1 - g0) / (t1 - t0 - clients),
            }
        )
    wall = sum(r["round_wall_s"] for r in rows)
    clients = sum(r[key] for r in rows)
    guard_s = sum(r["guards_s"] for r in rows)
    shares = [r["guards_share_of_overhead"] for r in rows]
    return {
        "lanes": lanes,
        "denominator": key,
        "rounds": rows,
        "ratio": wall / clients,
        "wall_s_per_round": wall / len(rows),
        "overhead_s_per_round": (wall - clients) / len(rows),
        "pass": wall / clients <= 1.05,
        "guards_s_per_round": guard_s / len(rows),
        "guards_share_of_overhead": guard_s / (wall - clients),
        "guards_share_of_overhead_max": max(shares),  # per round: a noisy round inflates only its own
        "guards_by_name_s": dict(guards),
        "guards_pass": max(shares) < 0.01,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()
    serial, lanes = run(args, "1"), run(args, "auto")
    write_result(
        "overhead",
        {
            "setup": {
                "model": args.model,
                "clients": args.clients,
                "local_steps": args.steps,
                "batch_size": 8,
                "rounds_measured": len(serial["rounds"]),
            },
            "runs": [serial, lanes],
            "target": 1.05,
            "guards_target": 0.01,
            "lanes_speedup": serial["wall_s_per_round"] / lanes["wall_s_per_round"],
            "pass": serial["pass"] and lanes["pass"],
            "guards_pass": serial["guards_pass"] and lanes["guards_pass"],
        },
    )


if __name__ == "__main__":
    main()
