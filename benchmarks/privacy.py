"""Epsilon vs accuracy: client-level DP-FedAvg at a few noise multipliers against the non-private run.

Runs ``fedtune compare examples/compare_privacy.yaml`` (or reads a finished comparison directory),
then checks every private run's epsilon against direct calls of the accountant libraries for the
parameters the run logged in summary.json (sample rate q, the accountant's noise multiplier, rounds
noised, delta): Google's dp-accounting (the accountant fedtune uses, RDP or PLD as the run was told)
and, as an independent implementation, Opacus's RDP accountant. Writes results/privacy.json (each
variant's epsilon, final eval loss and exact-match with their 95% intervals, the three epsilons of
every run) and results/privacy.png (final eval loss against epsilon, the non-private run as a band).

    python benchmarks/privacy.py                         # runs the comparison (about 50 minutes here)
    python benchmarks/privacy.py --comparison DIR        # checks and tabulates a finished comparison
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

from common import RESULTS, write_result

EXAMPLE = "examples/compare_privacy.yaml"


def dp_accounting_epsilon(told: dict) -> float:
    """dp-accounting, called directly on what the run logged (not through fedtune.privacy)."""
    import dp_accounting

    gaussian = dp_accounting.GaussianDpEvent(told["accountant_noise_multiplier"])
    if told["sampling"] == "poisson":
        one = dp_accounting.PoissonSampledDpEvent(told["sample_rate"], gaussian)
        relation = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    else:
        one = dp_accounting.SampledWithoutReplacementDpEvent(told["population"], told["sample_size"], gaussian)
        relation = dp_accounting.NeighboringRelation.REPLACE_ONE
    if told["accountant"].endswith("PLD"):
        accountant = dp_accounting.pld.PLDAccountant(neighboring_relation=relation)
    else:
        accountant = dp_accounting.rdp.RdpAccountant(neighboring_relation=relation)
    accountant.compose(dp_accounting.SelfComposedDpEvent(one, told["rounds_noised"]))
    return float(accountant.get_epsilon(told["delta"]))


def opacus_epsilon(told: dict) -> float | None:
    """Opacus's own RDP accountant (Poisson sampling only), a second implementation of the same bound."""
    if told["sampling"] != "poisson":
        return None
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(told["accountant_noise_multiplier"], told["sample_rate"], told["rounds_noised"])]
    return float(accountant.get_epsilon(told["delta"]))


def check(comparison: Path) -> dict:
    report = json.loads((comparison / "comparison.json").read_text())
    rows, worst, base_loss = [], 0.0, None
    for name, variant in report["variants"].items():
        runs = []
        for run in variant["runs"]:
            summary = json.loads((Path(run["run_dir"]) / "summary.json").read_text())
            told = summary.get("privacy")
            entry = {"seed": run["seed"], "final_eval_loss": run["measures"]["final_eval_loss"]}
            if told and told["accountant_noise_multiplier"] > 0:
                direct, opacus = dp_accounting_epsilon(told), opacus_epsilon(told)
                entry.update(epsilon_run=told["epsilon"], epsilon_dp_accounting=direct, epsilon_opacus=opacus)
                worst = max(worst, abs(told["epsilon"] - direct) / direct)
            elif told:  # no noise: epsilon is infinite (null in JSON) for the run and for the library
                entry["epsilon_run"] = told["epsilon"]
            runs.append(entry)
            base_loss = summary["initial"]["eval_loss"]  # round 0: the same model and evaluation set in every run
        s = variant["summary"]
        rows.append(
            {
                "variant": name,
                "overrides": variant["overrides"],
                "seeds": variant["seeds_done"],
                "epsilon": s["epsilon"]["mean"] if s.get("epsilon") else None,
                "final_eval_loss": s["final_eval_loss"],
                "final_accuracy": s["final_accuracy"],
                "runs": runs,
            }
        )
    return {
        "comparison": str(comparison),
        "base_model_eval_loss": base_loss,
        "ranking": report["ranking"],
        "max_rel_epsilon_gap": worst,
        "rows": rows,
    }


def plot(rows: list[dict], base_loss: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    private = [r for r in rows if r["epsilon"] is not None and math.isfinite(r["epsilon"])]
    bands = [r for r in rows if r not in private]  # no DP, or clipping without noise (epsilon infinite)
    for r, colour in zip(bands, ["k", "tab:orange", "tab:green"], strict=False):
        loss = r["final_eval_loss"]
        ax.axhline(loss["mean"], color=colour, lw=1, label=f"{r['variant']} (epsilon infinite)")
        ax.axhspan(loss["mean"] - loss["half_width"], loss["mean"] + loss["half_width"], color=colour, alpha=0.1)
    if base_loss is not None:
        ax.axhline(base_loss, color="grey", ls="--", lw=1, label="base model, untrained")
    xs = [r["epsilon"] for r in private]
    ax.errorbar(
        xs,
        [r["final_eval_loss"]["mean"] for r in private],
        yerr=[r["final_eval_loss"]["half_width"] for r in private],
        fmt="o-",
        capsize=3,
        label="DP-FedAvg",
    )
    for r, x in zip(private, xs, strict=True):
        ax.annotate(r["variant"], (x, r["final_eval_loss"]["mean"]), textcoords="offset points", xytext=(4, 4))
    ax.set_xscale("log")
    ax.set_xlabel("epsilon at delta 1e-5 after the last round (log)")
    ax.set_ylabel("final eval loss (95% interval over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comparison", type=Path, help="a finished comparison directory (default: run it)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/fedtune-bench-privacy"), help="where to run it")
    args = parser.parse_args()
    comparison = args.comparison
    if comparison is None:
        cmd = ["fedtune", "compare", EXAMPLE, f"output.dir={args.out}"]
        subprocess.run(cmd, check=True, stdout=sys.stderr)
        comparison = args.out / Path(EXAMPLE).stem
    result = check(comparison)
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(result["rows"], result["base_model_eval_loss"], RESULTS / "privacy.png")
    write_result("privacy", result)
    if result["max_rel_epsilon_gap"] > 1e-9:
        sys.exit(f"a run's epsilon differs from dp-accounting's by {result['max_rel_epsilon_gap']:.2e} (relative)")


if __name__ == "__main__":
    main()
