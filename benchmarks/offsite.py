"""Offsite-tuning on the bundled model beside LoRA parameter sharing (examples/compare_offsite.yaml).

Runs ``fedtune compare examples/compare_offsite.yaml`` (or reads a finished comparison) and writes
results/offsite.json: per variant and seed the zero-shot loss (round 0, the base model), the plug-in's
final loss (the adapter in the full model), the emulator + adapter's final loss and the gap between
them, the emulator's own loss before tuning (round 0), the client's peak memory; then, over the 3
seeds, 95% intervals of: plug-in minus zero-shot (below 0 is learning), plug-in minus LoRA parameter
sharing (paired by seed), the emulator gap, and the client's peak memory as a share of the LoRA
client's.

    python benchmarks/offsite.py [--comparison DIR]   # DIR: read a finished comparison instead
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import compared, interval, write_result

EXAMPLE = "examples/compare_offsite.yaml"
REFERENCE = "lora parameter sharing"


def _history(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def summarise(comparison: Path) -> dict:
    data = json.loads((comparison / "comparison.json").read_text())
    per: dict[str, dict[int, dict]] = {}
    for name, variant in data["variants"].items():
        for run in variant["runs"]:
            h = _history(run["run_dir"])
            per.setdefault(name, {})[run["seed"]] = {
                "zero_shot_loss": h[0]["eval_loss"],
                "plug_in_loss": h[-1]["eval_loss"],
                "emulator_loss": h[-1].get("emulator_eval_loss"),
                "emulator_gap": h[-1].get("emulator_gap"),
                "emulator_zero_shot_loss": h[0].get("emulator_eval_loss"),  # the emulator as sent, untuned
                "client_peak_bytes": run["measures"]["client_peak_bytes"],
                "bytes_down_per_client": run["measures"]["bytes_down_per_client"],
                "plug_in_loss_by_round": [r["eval_loss"] for r in h],
            }
    ref = per[REFERENCE]
    rows = []
    for name, seeds in per.items():
        common = sorted(set(seeds) & set(ref))
        row: dict = {"variant": name, "seeds": sorted(seeds), "runs": seeds}
        row["plug_in_loss"] = interval([s["plug_in_loss"] for s in seeds.values()])
        row["zero_shot_loss"] = interval([s["zero_shot_loss"] for s in seeds.values()])
        row["plug_in_minus_zero_shot"] = interval([s["plug_in_loss"] - s["zero_shot_loss"] for s in seeds.values()])
        row["below_zero_shot_every_seed"] = all(s["plug_in_loss"] < s["zero_shot_loss"] for s in seeds.values())
        row["minus_lora"] = interval([seeds[k]["plug_in_loss"] - ref[k]["plug_in_loss"] for k in common])
        row["peak_share_of_lora"] = interval(
            [seeds[k]["client_peak_bytes"] / ref[k]["client_peak_bytes"] for k in common]
        )
        gaps = [s["emulator_gap"] for s in seeds.values() if s["emulator_gap"] is not None]
        row["emulator_gap"] = interval(gaps) if gaps else None
        row["emulator_worse_every_seed"] = all(g > 0 for g in gaps) if gaps else None
        untuned = [s["emulator_zero_shot_loss"] for s in seeds.values() if s["emulator_zero_shot_loss"] is not None]
        row["emulator_zero_shot_loss"] = interval(untuned) if untuned else None
        row["bytes_down_per_client"] = interval([s["bytes_down_per_client"] for s in seeds.values()])
        rows.append(row)
    return {"comparison": str(comparison), "reference": REFERENCE, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--comparison", type=Path, default=None)
    args = ap.parse_args()
    comparison = compared(EXAMPLE, args.comparison)
    write_result("offsite", {"example": EXAMPLE, **summarise(comparison)})


if __name__ == "__main__":
    main()
