"""Split-FedLLM against parameter sharing on the quickstart setup: quality, bytes, and the client's cost.

Each row is one federated run of the quickstart's setup (bundled SmolLM2-135M-Instruct, 30 blocks,
LoRA r=8 on q/k/v/o, the built-in tasks split by task over 4 clients, 5 rounds x 5 local steps of
batch 8, every client every round): parameter sharing with fp32 LoRA (examples/quickstart.yaml), or
split learning (examples/split.yaml's setup) U-shaped with 1+1 or 2+2 client blocks, or vanilla with
2 client blocks; all with float32 on the wire. Evaluated on all 100 held-out problems after the last
round. The client's cost is what every paradigm reports (fedtune.client.cost): its compute seconds,
its peak memory (the model part it holds plus the most activation bytes autograd kept at once), and
analytic FLOPs; per client and round.

    python benchmarks/split.py [--only "split u 1+1;parameter sharing"] [--seeds 3] [--table]

Writes results/split.json after every row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

from common import RESULTS, interval, merge_rows, plus_minus, quickstart_setup, write_result

from fedtune.config import load_config
from fedtune.experiment import run_experiment

COSTS = (
    "up_bytes_per_client_round",
    "down_bytes_per_client_round",
    "client_s_per_round",
    "client_peak_bytes",
    "client_flops_per_round",
)
COMMON = ["evaluation.every=0", "evaluation.max_samples=null", "output.progress=false"]
ROWS: dict[str, tuple[str, list[str]]] = {
    "parameter sharing": ("examples/quickstart.yaml", []),
    "split u 1+1": ("examples/split.yaml", ["paradigm.client_front=1", "paradigm.client_back=1"]),
    "split u 2+2": ("examples/split.yaml", ["paradigm.client_front=2", "paradigm.client_back=2"]),
    "split vanilla 2": ("examples/split.yaml", ["paradigm.shape=vanilla", "paradigm.client_front=2"]),
}


def run_row(name: str, seed: int, tmp: str) -> dict:
    config, overrides = ROWS[name]
    out = [f"output.dir={tmp}", f"output.name={name.replace(' ', '_').replace('+', 'p')}-seed{seed}"]
    cfg = load_config(config, [*COMMON, *overrides, f"seed={seed}", *out])
    t = time.perf_counter()
    result = run_experiment(cfg)
    hist = [h for h in result.state.history if h["round"] > 0]
    n = sum(len(h["clients"]) for h in hist)
    row = {
        "seed": seed,
        "base_eval_loss": result.state.history[0]["eval_loss"],
        "final_eval_loss": hist[-1]["eval_loss"],
        "final_accuracy": hist[-1]["eval_accuracy"],
        "up_bytes_per_client_round": sum(h["bytes_up"] for h in hist) / n,
        "down_bytes_per_client_round": sum(h["bytes_down"] for h in hist) / n,
        "client_s_per_round": sum(h["local_train_s"] for h in hist) / n,
        "client_peak_bytes": max(h["client_peak_bytes"] for h in hist),
        "client_flops_per_round": sum(h["client_flops"] for h in hist) / n,
        "wall_s": time.perf_counter() - t,
    }
    print(name, row, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--only", default="", help="';'-separated subset of: " + "; ".join(ROWS))
    ap.add_argument("--table", action="store_true", help="print the markdown table of the saved results and exit")
    args = ap.parse_args()
    if args.table:
        print(markdown_table(json.loads((RESULTS / "split.json").read_text())))
        return
    chosen = [r for r in ROWS if not args.only or r in args.only.split(";")]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in chosen:
            rows.append(
                {"name": name, "overrides": ROWS[name][1], "runs": [run_row(name, s, tmp) for s in range(args.seeds)]}
            )
            write_result(
                "split",
                {
                    "setup": quickstart_setup(5, 5, eval_examples=100, wire="float32"),
                    "rows": merge_rows("split", rows, "name", list(ROWS)),
                },
            )


def markdown_table(result: dict) -> str:
    """Quality as the mean ± a 95% t-interval over seeds; costs as the mean, and their ratio to parameter
    sharing's (bytes, peak memory and FLOPs do not depend on the seed; seconds are timings)."""
    means = {r["name"]: {k: statistics.fmean(x[k] for x in r["runs"]) for k in COSTS} for r in result["rows"]}
    ref = means["parameter sharing"]
    lines = [
        "| row | seeds | final eval loss | exact-match | MB up+down / client / round | client s / round | "
        "client peak MB | client GFLOP / round |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        runs, m = row["runs"], means[row["name"]]
        loss, dl = interval([x["final_eval_loss"] for x in runs])
        acc, da = interval([100 * x["final_accuracy"] for x in runs])
        mb = m["up_bytes_per_client_round"] + m["down_bytes_per_client_round"]
        ref_mb = ref["up_bytes_per_client_round"] + ref["down_bytes_per_client_round"]
        lines.append(
            f"| {row['name']} | {len(runs)} | {plus_minus(loss, dl, '.3f')} | {plus_minus(acc, da, '.1f')}% "
            f"| {mb / 1e6:.1f} ({mb / ref_mb:.1f}x) | {m['client_s_per_round']:.1f} "
            f"({m['client_s_per_round'] / ref['client_s_per_round']:.2f}x) | {m['client_peak_bytes'] / 1e6:.0f} "
            f"({m['client_peak_bytes'] / ref['client_peak_bytes']:.2f}x) | {m['client_flops_per_round'] / 1e9:.0f} "
            f"({m['client_flops_per_round'] / ref['client_flops_per_round']:.3f}x) |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
