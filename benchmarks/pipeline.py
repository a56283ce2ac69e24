"""The benchmark pipeline end to end on the bundled model, offline (examples/compare_pipeline.yaml).

Writes generated sets in the public schemas (``fedtune.data.builtin.shaped``): 480 Dolly-shaped
training records (4 categories) and 40 held-out ones for ROUGE-L, 60 MMLU-shaped questions (3
subjects), 12 MBPP-shaped code tasks; then runs ``fedtune compare examples/compare_pipeline.yaml``
(LoRA and IA3, 3 seeds) and writes results/pipeline.json: each variant's scores before (the base
model, round 0) and after 3 rounds, with 95% intervals over seeds.

    python benchmarks/pipeline.py [--comparison DIR]   # DIR: read a finished comparison instead
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import RESULTS, compared, interval, write_result

EXAMPLE = "examples/compare_pipeline.yaml"
DATA = RESULTS / "pipeline_data"
SCORES = ("dolly_rouge_l", "mmlu_accuracy", "mbpp_pass_at_1")


def write_sets() -> None:
    from fedtune.data.builtin.shaped import records

    DATA.mkdir(parents=True, exist_ok=True)
    dolly = records("dolly", 520)  # one draw: the held-out problems are not among the training ones
    sets = {"dolly_train": dolly[:480], "dolly_eval": dolly[480:], "mmlu": records("mmlu", 60),
            "mbpp": records("mbpp", 12)}  # fmt: skip
    for name, rows in sets.items():
        (DATA / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def summarise(comparison: Path) -> dict:
    data = json.loads((comparison / "comparison.json").read_text())
    rows = []
    for name, variant in data["variants"].items():
        runs = variant["runs"]
        histories = [
            [json.loads(line) for line in (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()] for r in runs
        ]
        row = {"variant": name, "seeds": len(runs)}
        for key in (*SCORES, "eval_loss"):
            start = [h[0][key] for h in histories if key in h[0]]
            end = [h[-1][key] for h in histories if key in h[-1]]
            row[key] = {"start": interval(start) if start else None, "end": interval(end) if end else None}
        row["bytes_up_per_client"] = interval([r["measures"]["bytes_up_per_client"] for r in runs])
        rows.append(row)
    return {"comparison": str(comparison), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--comparison", type=Path, default=None)
    args = ap.parse_args()
    if args.comparison is None:
        write_sets()
    comparison = compared(EXAMPLE, args.comparison)
    write_result("pipeline", {"example": EXAMPLE, **summarise(comparison)})


if __name__ == "__main__":
    main()
