"""A comparison's plots: eval loss against cumulative bytes, against cumulative client FLOPs, and by
round; one line per variant (the mean over seeds) with its 95% interval as a band."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedtune.reporting.stats import interval

PLOTS = {  # file stem -> (x curve, x label, log x, title)
    "loss_vs_bytes": ("bytes_per_client", "MB up + down per client, cumulative", True, "Loss against communication"),
    "loss_vs_client_flops": (
        "client_flops",
        "client GFLOP per client, cumulative",
        True,
        "Loss against client compute",
    ),
    "loss_by_round": ("round", "round", False, "Loss by round"),
}
SCALE = {"bytes_per_client": 1e-6, "client_flops": 1e-9, "round": 1.0}


def mean_curves(runs: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Per evaluated round the seeds share: mean x values, and the eval loss's mean and interval bounds."""
    rounds = sorted(set.intersection(*(set(r["curves"]["round"]) for r in runs))) if runs else []
    out: dict[str, list[Any]] = {"round": rounds, "loss": [], "low": [], "high": []}
    for key in ("bytes_per_client", "client_flops"):
        out[key] = []
    for rnd in rounds:
        at = [r["curves"]["round"].index(rnd) for r in runs]
        loss = interval([r["curves"]["eval_loss"][i] for r, i in zip(runs, at, strict=True)])
        out["loss"].append(loss.mean)
        out["low"].append(loss.low)
        out["high"].append(loss.high)
        for key in ("bytes_per_client", "client_flops"):
            out[key].append(sum(r["curves"][key][i] for r, i in zip(runs, at, strict=True)) / len(runs))
    return out


def draw_plots(variants: dict[str, Any], directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {name: mean_curves(v["runs"]) for name, v in variants.items() if v["runs"]}
    paths = []
    for stem, (key, label, log_x, title) in PLOTS.items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, c in curves.items():
            xs = [x * SCALE[key] for x in c[key]]
            # round 0 has no traffic or compute yet: a log axis starts at the first round
            keep = [i for i, x in enumerate(xs) if x > 0 or not log_x]
            if not keep:
                continue
            x = [xs[i] for i in keep]
            (line,) = ax.plot(x, [c["loss"][i] for i in keep], marker="o", markersize=3, label=name)
            ax.fill_between(
                x, [c["low"][i] for i in keep], [c["high"][i] for i in keep], color=line.get_color(), alpha=0.2
            )
        if log_x:
            ax.set_xscale("log")
        ax.set_title(f"{title}: each variant's mean over its seeds, with its 95% interval", fontsize=10)
        ax.set_xlabel(label)
        ax.set_ylabel("held-out eval loss")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = directory / f"{stem}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
