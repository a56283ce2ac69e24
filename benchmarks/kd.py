"""KD-FedLLM against parameter sharing on the quickstart setup: quality, bytes and client compute.

Each row is one federated run of examples/kd.yaml's setup (bundled SmolLM2-135M-Instruct, the
built-in tasks split by task over 4 clients, 5 rounds x 5 local steps, every client every round):
parameter sharing with fp32 LoRA (examples/quickstart.yaml), or KD-FedLLM with the consensus or
the adapter on the downlink, for k in {1, 8, 64} token probabilities per position and two public
slice sizes; then a few variations (confidence weighting, 15 distillation steps) and one row with
long public answers, where KD's bytes pass LoRA's. KD rows send fp32 log-probabilities and uint16
token ids (no value codec), as the LoRA row sends fp32 weights. All rows are evaluated on all 100
held-out problems after the last round; with logits on the downlink the eval loss is the mean over
the clients' own adapters.
Some rows run several seeds (client batches, adapter init, public slices; the evaluation set is
the same), and the table gives their mean and a 95% t-interval.

    python benchmarks/kd.py [--only "lora;kd logits k=8 slice=64"] [--seeds 3] [--table]

Writes results/kd.json after every row; rows that were not re-run (--only, or an interrupted run)
are kept.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from common import RESULTS, interval, merge_rows, plus_minus, quickstart_setup, write_result

from fedtune.config import load_config
from fedtune.data.builtin.tasks import TASKS, generate_public
from fedtune.experiment import run_experiment

KD_BASE = "examples/kd.yaml"
PS_BASE = "examples/quickstart.yaml"
COMMON = ["evaluation.every=0", "evaluation.max_samples=null", "output.progress=false"]
FP32 = ["compression.uplink=[]", "compression.downlink=[]"]  # KD rows: values as computed, like the LoRA row

ROWS: dict[str, tuple[str, list[str]]] = {"lora": (PS_BASE, [])}
for downlink in ("logits", "adapter"):
    for k in (1, 8, 64):
        for size in (16, 64):
            ROWS[f"kd {downlink} k={k} slice={size}"] = (
                KD_BASE,
                [*FP32, f"paradigm.downlink={downlink}", f"paradigm.top_k={k}", f"paradigm.public_slice={size}"],
            )
# beyond the grid: what helps KD on this by-task split (each client an expert in one task family)
BASE_KD = ROWS["kd logits k=8 slice=64"][1]
ROWS["kd logits k=8 slice=64, confidence weighting"] = (KD_BASE, [*BASE_KD, "paradigm.weighting=confidence"])
ROWS["kd logits k=8 slice=64, 15 distillation steps"] = (KD_BASE, [*BASE_KD, "paradigm.distill_steps=15"])
ROWS["kd adapter k=8 slice=64, confidence weighting"] = (
    KD_BASE,
    [*ROWS["kd adapter k=8 slice=64"][1], "paradigm.weighting=confidence"],
)
ROWS["kd adapter k=8 slice=64, 15 distillation steps"] = (
    KD_BASE,
    [*ROWS["kd adapter k=8 slice=64"][1], "paradigm.distill_steps=15"],
)
# where KD costs more bytes than LoRA: public answers of ~150 tokens instead of ~3.5
LONG = "kd logits k=64 slice=64, long public answers"
ROWS[LONG] = (KD_BASE, [*ROWS["kd logits k=64 slice=64"][1], "data.public_dataset={public}", "data.max_seq_len=256"])
SEEDED = (  # rows run with --seeds seeds
    "lora",
    "kd logits k=8 slice=64",
    "kd adapter k=8 slice=64",
    "kd logits k=8 slice=64, confidence weighting",
    "kd adapter k=8 slice=64, confidence weighting",
)


def run_row(name: str, seed: int, tmp: str, base: bool) -> dict:
    config, overrides = ROWS[name]
    overrides = [o.format(public=long_public_file(tmp)) for o in overrides]
    start = [] if base else ["evaluation.at_start=false"]
    out = [f"output.dir={tmp}", f"output.name={name.replace(' ', '_')}-seed{seed}"]
    cfg = load_config(config, [*COMMON, *overrides, *start, f"seed={seed}", *out])
    t = time.perf_counter()
    result = run_experiment(cfg)
    hist = [h for h in result.state.history if h["round"] > 0]
    n = sum(len(h["clients"]) for h in hist)
    out = {
        "seed": seed,
        "final_eval_loss": hist[-1]["eval_loss"],
        "final_accuracy": hist[-1]["eval_accuracy"],
        "up_bytes_per_client_round": sum(h["bytes_up"] for h in hist) / n,
        "down_bytes_per_client_round": sum(h["bytes_down"] for h in hist) / n,
        "client_s_per_round": sum(h["local_train_s"] for h in hist) / n,
        "server_distill_s_per_round": sum(h.get("server_distill_s") or 0.0 for h in hist) / len(hist),
        "wall_s": time.perf_counter() - t,
    }
    if base:
        out["base_eval_loss"] = result.state.history[0]["eval_loss"]
        out["base_accuracy"] = result.state.history[0]["eval_accuracy"]
    print(name, out, flush=True)
    return out


def long_public_file(tmp: str) -> str:
    """The built-in public problems, each answer followed by five other public problems worked the
    same way (~150 response tokens each): only the response length differs from the default set."""
    path = Path(tmp) / "long_public.jsonl"
    if not path.exists():
        public = generate_public(list(TASKS), 400, 25, 100)
        with path.open("w") as f:
            for i, ex in enumerate(public):
                others = [public[(i + 37 * j) % len(public)] for j in range(1, 6)]
                worked = " ".join(
                    f"({o.messages[0]['content'].replace(chr(10), ' ')} Answer: {o.target})" for o in others
                )
                answer = f"{ex.target}. Similar problems: {worked}"
                f.write(json.dumps({"messages": [*ex.messages[:-1], {"role": "assistant", "content": answer}]}) + "\n")
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3, help=f"seeds for the rows {', '.join(SEEDED)}")
    ap.add_argument("--only", default="", help="';'-separated subset of: " + "; ".join(ROWS))
    ap.add_argument("--table", action="store_true", help="print the markdown table of the saved results and exit")
    args = ap.parse_args()
    if args.table:
        print(markdown_table(json.loads((RESULTS / "kd.json").read_text())))
        return
    chosen = [r for r in ROWS if not args.only or r in args.only.split(";")]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in chosen:
            seeds = range(args.seeds) if name in SEEDED else range(1)
            runs = [run_row(name, s, tmp, base=(name == "lora" and s == 0)) for s in seeds]
            rows.append({"name": name, "overrides": ROWS[name][1], "runs": runs})
            save(rows)  # after every row: an interrupted benchmark keeps what it measured


def save(rows: list[dict]) -> None:
    """Fresh rows plus the saved ones that were not re-run, in the table's order."""
    write_result(
        "kd",
        {
            "setup": quickstart_setup(5, 5, eval_examples=100, kd_config=KD_BASE, reference="lora: fp32 LoRA r=8"),
            "rows": merge_rows("kd", rows, "name", list(ROWS)),
        },
    )


def _vs(ref: float, bytes_: float) -> str:
    """'1,233x fewer' or '1.02x more': total bytes against the reference's."""
    ratio, word = (ref / bytes_, "fewer") if bytes_ <= ref else (bytes_ / ref, "more")
    return f"{ratio:,.0f}x {word}" if ratio >= 10 else f"{ratio:.2f}x {word}"


def markdown_table(result: dict) -> str:
    rows = result["rows"]
    ref = next(r for r in rows if r["name"] == "lora")
    base = ref["runs"][0]
    ref_bytes = statistics.fmean(r["up_bytes_per_client_round"] + r["down_bytes_per_client_round"] for r in ref["runs"])
    acc0 = 100 * base["base_accuracy"]
    out = [
        f"Base model (no training): eval loss {base['base_eval_loss']:.3f}, exact-match {acc0:.0f}%.",
        "",
        "| row | seeds | final eval loss | exact-match | KB up / client / round | KB down | bytes up + down vs LoRA "
        "| client s / round |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        runs = r["runs"]
        loss, dl = interval([x["final_eval_loss"] for x in runs])
        acc, da = interval([100 * x["final_accuracy"] for x in runs])
        up = statistics.fmean(x["up_bytes_per_client_round"] for x in runs)
        down = statistics.fmean(x["down_bytes_per_client_round"] for x in runs)
        secs = statistics.fmean(x["client_s_per_round"] for x in runs)
        out.append(
            f"| {r['name']} | {len(runs)} | {plus_minus(loss, dl, '.3f')} | {plus_minus(acc, da, '.1f')}% "
            f"| {up / 1e3:,.1f} | {down / 1e3:,.1f} "
            f"| {'reference' if r is ref else _vs(ref_bytes, up + down)} | {secs:.1f} |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    main()
