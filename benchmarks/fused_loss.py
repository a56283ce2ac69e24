"""The fused LM-head loss (training.fused_loss) vs the plain one: memory, time and loss of a client's round.

Client 0 of the runtimes job (``runtimes.py``: built-in tasks, IID over 8 clients, LoRA r=8 on
q,k,v,o) trains one round of local steps on the bundled SmolLM2-135M (49k-token vocabulary), with
one torch thread as in a lane, each variant in a fresh process, alternating, ``--repeats`` times
per case: ``BxT`` (batch B, max_seq_len T, loss on the responses) or ``BxT+prompt`` (loss on every
token: ``data.train_on_prompt``). Measured per run: the activation bytes autograd keeps at the largest (exact), the
process's peak PSS (sampled every 20 ms) over its baseline once loaded with every weight paged in,
the round's training time, and the mean loss (the two paths agree up to float summation order).

    python benchmarks/fused_loss.py [--repeats 3] [--cases 4x128 4x256+prompt]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

from common import interval, run_measured, write_result
from runtimes import job_overrides

VARIANTS = ("plain", "fused")


def parse_case(case: str) -> tuple[int, int, bool]:
    shape, _, prompt = case.partition("+")
    batch, seq = (int(x) for x in shape.split("x"))
    return batch, seq, prompt == "prompt"


def child(variant: str, case: str, steps: int) -> None:
    import torch

    from fedtune.assembly import build_client_data, build_workbench, plan_of
    from fedtune.client.trainer import LocalTrainer
    from fedtune.config import load_config
    from fedtune.data.prepare import prepare_federated_data

    with tempfile.TemporaryDirectory() as tmp:
        torch.set_num_threads(1)
        batch, seq, prompt = parse_case(case)
        cfg = load_config(
            "examples/tiny.yaml",
            [
                *job_overrides("smollm2-135m", 8, tmp),
                f"training.batch_size={batch}",
                f"data.max_seq_len={seq}",
                f"training.local_steps={steps}",
                f"data.train_on_prompt={str(prompt).lower()}",
                f"training.fused_loss={str(variant == 'fused').lower()}",
            ],
        )
        bench = build_workbench(cfg, plan_of(cfg), announce=False)
        data = build_client_data(prepare_federated_data(cfg.data, cfg.partition, cfg.seed), bench.encoder, cfg)
        trainer = LocalTrainer(cfg.training, cfg.federation.rounds, cfg.seed, bench.tokenizer.pad_token_id)
        with torch.no_grad():  # page every (memory-mapped) weight in before the baseline
            sum(float(p.sum()) for p in bench.adapter.model.parameters())
        print(json.dumps({"loaded": True}), flush=True)  # the parent's baseline mark
        out = trainer.train(bench.adapter, 0, 1, data[0])
    r = out.result
    print(json.dumps({"kept_mb": r.peak_activation_bytes / 2**20, "train_s": out.elapsed_s, "loss": r.mean_loss}))


def measure(variant: str, case: str, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--cases", case, "--steps", str(steps)]
    run = run_measured(cmd, every_s=0.02, mark='{"loaded": true}')
    if run.returncode != 0:
        raise RuntimeError(f"{variant} {case} failed:\n{run.output[-3000:]}")
    found = json.loads(run.output.strip().splitlines()[-1])
    return {**found, "peak_pss_mb": run.peak_pss / 2**20, "training_pss_mb": (run.peak_pss - run.marked_pss) / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cases", nargs="+", default=["4x128", "4x256+prompt"], help="BxT[+prompt]")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--child", choices=VARIANTS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.cases[0], args.steps)
        return
    rows = []
    for case in args.cases:
        runs = {v: [] for v in VARIANTS}
        for _ in range(args.repeats):
            for v in VARIANTS:
                runs[v].append(measure(v, case, args.steps))
                print(case, v, runs[v][-1], flush=True)
        batch, seq, prompt = parse_case(case)
        row = {"case": case, "batch": batch, "max_seq_len": seq, "train_on_prompt": prompt}
        for key in ("kept_mb", "training_pss_mb", "peak_pss_mb", "train_s"):
            digits = 2 if key == "train_s" else 1
            for v in VARIANTS:
                mean, half = interval([r[key] for r in runs[v]])
                row[f"{v}_{key}"] = [round(mean, digits), round(half, digits)]
            ratio = [f[key] / p[key] for f, p in zip(runs["fused"], runs["plain"], strict=True)]
            row[f"ratio_{key}"] = [round(x, 3) for x in interval(ratio)]
        pairs = zip(runs["fused"], runs["plain"], strict=True)
        row["loss_gap_rel"] = max(abs(f["loss"] - p["loss"]) / p["loss"] for f, p in pairs)
        row["runs"] = runs
        rows.append(row)
    write_result("fused_loss", {"setup": {"model": "smollm2-135m", "steps": args.steps}, "rows": rows})


if __name__ == "__main__":
    main()
