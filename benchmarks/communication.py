"""The communication-quality frontier: bytes on the wire vs final eval loss / accuracy.

Each row is one federated run of the quickstart setup (bundled SmolLM2-135M-Instruct, built-in
tasks split by task over 4 clients, 5 rounds x 5 local steps as in the quickstart (about 2.5 minutes a
row on 2 CPU cores), every client every round) with one
PEFT method, or LoRA with one compression chain. Bytes are the real serialised messages the
round loop counted (uplink and downlink, per client per round). Quality is the final global
adapter on the 40 held-out problems. Learning rates per PEFT method are fixed, not tuned: the
usual order of magnitude for each (prompt-style methods and IA3 need larger steps than LoRA).

    python benchmarks/communication.py [--only lora,int8] [--rounds 5] [--steps 5]

Writes results/communication.json and results/communication.png; with --only, chosen rows replace
their namesakes and the rest are kept.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from common import RESULTS, merge_rows, quickstart_setup, write_result

from fedtune.config import load_config
from fedtune.core.errors import ConfigError
from fedtune.experiment import run_experiment

EF = "compression.error_feedback=true"


UPDATES = "compression.downlink_updates=true"
IA3 = ["adapter.method=ia3", "training.lr=1e-2"]
IA3_FAST = ["adapter.method=ia3", "training.lr=2e-2"]


def up(*chain: str) -> str:
    return f"compression.uplink=[{', '.join(chain)}]"


def both(*chain: str) -> list[str]:
    """The same chain on the uplink and, as updates to each client's replica, on the downlink."""
    return [up(*chain), f"compression.downlink=[{', '.join(chain)}]", UPDATES]


ROWS: dict[str, tuple[str, list[str]]] = {  # name -> (group, overrides)
    "lora": ("peft", []),  # the reference: fp32 LoRA r=8 on q/k/v/o, FedAvg (exact)
    "dora": ("peft", ["adapter.dora=true"]),
    "ia3": ("peft", IA3),
    "prompt_tuning": ("peft", ["adapter.method=prompt_tuning", "training.lr=3e-2"]),
    "prefix_tuning": ("peft", ["adapter.method=prefix_tuning", "training.lr=1e-2"]),
    "p_tuning": ("peft", ["adapter.method=p_tuning", "training.lr=1e-2"]),
    "bottleneck": ("peft", ["adapter.method=bottleneck"]),
    "bitfit": ("peft", ["adapter.method=bitfit"]),
    "bf16 both ways": ("codec", [up("bf16"), "compression.downlink=[bf16]"]),
    "int8 both ways": ("codec", [up("int8"), "compression.downlink=[int8]"]),
    "int4": ("codec", [up("int4")]),
    "topk 10% +EF": ("codec", [up("{name: topk, fraction: 0.1}"), EF]),
    "randk 10% +EF": ("codec", [up("{name: randk, fraction: 0.1}"), EF]),
    "lowrank 2 +EF": ("codec", [up("{name: lowrank, rank: 2}"), EF]),
    "block_dropout 50% +EF": ("codec", [up("{name: block_dropout, keep_fraction: 0.5}"), EF]),
    "topk 5% > int4 +EF": ("chain", [up("{name: topk, fraction: 0.05}", "int4"), EF]),
    "topk 2% > int8 +EF": ("chain", [up("{name: topk, fraction: 0.02}", "int8"), EF]),
    "topk 2% > int8 (no EF)": ("chain", [up("{name: topk, fraction: 0.02}", "int8")]),
    "randk 5% > int8 +EF": ("chain", [up("{name: randk, fraction: 0.05}", "int8"), EF]),
    "block_dropout 25% > int4 +EF": ("chain", [up("{name: block_dropout, keep_fraction: 0.25}", "int4"), EF]),
    "lowrank 1 > int4 +EF": ("chain", [up("{name: lowrank, rank: 1}", "int4"), EF]),
    "topk 5% > int4 +EF, int8 down": (
        "chain",
        [up("{name: topk, fraction: 0.05}", "int4"), EF, "compression.downlink=[int8]"],
    ),
    # a small adapter and quantisation both ways
    "int4 both ways": ("combined", [up("int4"), "compression.downlink=[int4]"]),
    "ia3 lr 2e-2": ("combined", IA3_FAST),
    "ia3 + int8 both ways": ("combined", [*IA3, up("int8"), "compression.downlink=[int8]"]),
    "ia3 + int4 both ways": ("combined", [*IA3, up("int4"), "compression.downlink=[int4]"]),
    "ia3 lr 2e-2 + int4 both ways": (
        "combined",
        [*IA3_FAST, up("int4"), "compression.downlink=[int4]"],
    ),
    "lora r=2 + int4 both ways": (
        "combined",
        ["adapter.r=2", "adapter.alpha=4", up("int4"), "compression.downlink=[int4]"],
    ),
    # downlink updates: each client receives the compressed change to the adapter it holds
    "fp32 downlink updates (aligned factors)": ("both ways", [UPDATES]),
    "topk 5% > int4 both ways": ("both ways", [*both("{name: topk, fraction: 0.05}", "int4"), EF]),
    "int4 both ways (updates)": ("both ways", both("int4")),
    "ia3 lr 2e-2 + int8 both ways (updates)": ("both ways", [*IA3_FAST, *both("int8")]),
    "ia3 lr 2e-2 + int4 both ways (updates)": ("both ways", [*IA3_FAST, *both("int4")]),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(ROWS))
    ap.add_argument("--table", action="store_true", help="print the markdown table of the saved results and exit")
    args = ap.parse_args()
    if args.table:
        print(markdown_table(json.loads((RESULTS / "communication.json").read_text())["rows"]))
        return
    chosen = [r for r in ROWS if not args.only or r in args.only.split(",")]
    common = [
        f"federation.rounds={args.rounds}",
        f"training.local_steps={args.steps}",
        "evaluation.every=0",
        "evaluation.at_start=false",
        "output.progress=false",
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(chosen):
            group, overrides = ROWS[name]
            t = time.perf_counter()
            cfg = load_config(
                "examples/quickstart.yaml", [*common, *overrides, f"output.dir={tmp}", f"output.name=row{i}"]
            )
            row = {"name": name, "group": group, "overrides": overrides, "lr": cfg.training.lr}
            try:
                result = run_experiment(cfg)
            except ConfigError as exc:  # e.g. BitFit on a bias-free model: reported, not hidden
                rows.append({**row, "skipped": str(exc)})
                print(rows[-1], flush=True)
                continue
            hist = [h for h in result.state.history if h["round"] > 0]
            last, n = hist[-1], sum(len(h["clients"]) for h in hist)
            row.update(
                trainable_params=result.summary["trainable_params"],
                final_eval_loss=last["eval_loss"],
                final_accuracy=last["eval_accuracy"],
                accuracy_by_task=last.get("eval_accuracy_by_task"),
                up_bytes_per_client_round=sum(h["bytes_up"] for h in hist) / n,
                down_bytes_per_client_round=sum(h["bytes_down"] for h in hist) / n,
                total_bytes=sum(h["bytes_up"] + h["bytes_down"] for h in hist),
                wall_s=time.perf_counter() - t,
            )
            rows.append(row)
            print(row, flush=True)
    if args.only:  # keep the rows that were not re-run
        rows = merge_rows("communication", rows, "name", list(ROWS))
    add_ratios(rows)
    write_result(
        "communication",
        {
            "setup": quickstart_setup(args.rounds, args.steps, reference="lora (fp32 LoRA r=8 q/k/v/o, FedAvg exact)"),
            "rows": rows,
        },
    )
    plot(rows, RESULTS / "communication.png", f"{args.rounds} rounds x {args.steps} steps")


def add_ratios(rows: list[dict]) -> None:
    """Bytes saved and loss change relative to the fp32 LoRA row."""
    ref = next((r for r in rows if r["name"] == "lora" and "skipped" not in r), None)
    if ref is None:
        return
    for r in rows:
        if "skipped" in r:
            continue
        r["up_reduction"] = ref["up_bytes_per_client_round"] / r["up_bytes_per_client_round"]
        r["total_reduction"] = ref["total_bytes"] / r["total_bytes"]
        r["loss_change"] = r["final_eval_loss"] / ref["final_eval_loss"] - 1


def markdown_table(rows: list[dict]) -> str:
    """The README table: bytes per client per round each way, reductions vs fp32 LoRA, quality."""
    out = [
        "| row | trainable | KB up / client / round | KB down | up reduction | total reduction "
        "| final eval loss | vs fp32 LoRA | exact-match |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "skipped" in r:
            out.append(f"| {r['name']} | - | - | - | - | - | - | - | skipped: {r['skipped'].split('. ')[0]} |")
            continue
        out.append(
            f"| {r['name']} | {r['trainable_params']:,} | {r['up_bytes_per_client_round'] / 1e3:,.1f} "
            f"| {r['down_bytes_per_client_round'] / 1e3:,.1f} | {r['up_reduction']:.1f}x | {r['total_reduction']:.1f}x "
            f"| {r['final_eval_loss']:.3f} | {100 * r['loss_change']:+.1f}% | {100 * r['final_accuracy']:.1f}% |"
        )
    return "\n".join(out)


def plot(rows: list[dict], path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if "skipped" not in r]
    fig, axes = plt.subplots(1, 2, figsize=(15, 6.5))
    colors = {
        "peft": "tab:blue",
        "codec": "tab:orange",
        "chain": "tab:green",
        "both ways": "tab:red",
        "combined": "tab:purple",
    }
    for ax, key, label in ((axes[0], "final_eval_loss", "final eval loss"), (axes[1], "final_accuracy", "exact match")):
        for r in done:
            x = r["up_bytes_per_client_round"] + r["down_bytes_per_client_round"]
            ax.scatter(x, r[key], color=colors[r["group"]], s=25)
            ax.annotate(r["name"], (x, r[key]), fontsize=7, xytext=(3, 2), textcoords="offset points")
        ref = next((r for r in done if r["name"] == "lora"), None)
        if ref is not None:
            ax.axvline(
                (ref["up_bytes_per_client_round"] + ref["down_bytes_per_client_round"]) / 32, color="gray", ls=":", lw=1
            )
            ax.axhline(ref[key] * (1.01 if key == "final_eval_loss" else 1), color="gray", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("bytes per client per round, up + down (log)")
        ax.set_ylabel(label)
    for group, c in colors.items():
        axes[0].scatter([], [], color=c, label=group)
    axes[0].legend(title="dotted: 32x fewer bytes than fp32 LoRA; +1% loss")
    fig.suptitle(f"fedtune: bytes on the wire vs quality (SmolLM2-135M, 4 non-IID clients, {title})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
