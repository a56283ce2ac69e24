"""One run's curves from its metrics.jsonl: ``fedtune report RUN --plot`` writes RUN/curves.png.

Panels: train and held-out loss by round; exact-match and every benchmark score of
``evaluation.tasks`` by round (where the run has them); held-out loss against the cumulative bytes a
client sent and received (where it has trained rounds).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedtune.reporting.metrics import benchmark_metrics


def draw_run(history: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    evals = [r for r in history if r.get("eval_loss") is not None]
    trained = [r for r in history if r["round"] > 0 and "train_loss" in r]
    scores: dict[str, list[tuple[int, float]]] = {}
    for r in evals:
        if r.get("eval_accuracy") is not None:
            scores.setdefault("exact-match", []).append((r["round"], r["eval_accuracy"]))
        for key, value in benchmark_metrics(r).items():
            scores.setdefault(key, []).append((r["round"], value))
    panels = 1 + bool(scores) + bool(trained)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    axes = list(axes[0])
    ax = axes.pop(0)
    ax.plot([r["round"] for r in evals], [r["eval_loss"] for r in evals], marker="o", label="eval loss")
    if trained:
        ax.plot([r["round"] for r in trained], [r["train_loss"] for r in trained], marker=".", label="train loss")
    ax.set(xlabel="round", ylabel="loss", title="Loss by round")
    ax.legend()
    if scores:
        ax = axes.pop(0)
        for name, points in scores.items():
            ax.plot(*zip(*points, strict=True), marker="o", label=name)
        ax.set(xlabel="round", ylabel="score", title="Scores by round", ylim=(-0.02, 1.02))
        ax.legend(fontsize="small")
    if trained:
        ax = axes.pop(0)
        clients = max(1, max(len(r.get("clients", [])) for r in trained))
        sent, xs, ys = 0.0, [], []
        for r in history:
            sent += (r.get("bytes_up", 0) + r.get("bytes_down", 0)) / clients if r["round"] > 0 else 0
            if r.get("eval_loss") is not None and r["round"] > 0:
                xs.append(sent / 1e6)
                ys.append(r["eval_loss"])
        ax.plot(xs, ys, marker="o")
        ax.set(xlabel="MB up + down per sampled client, cumulative", ylabel="eval loss", title="Loss against bytes")
    for ax in fig.axes[: 1 + bool(scores)]:  # rounds are whole numbers
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
