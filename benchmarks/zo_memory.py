"""A zeroth-order client's peak memory against an inference pass's, and against a backprop step's, measured.

Each mode runs in a fresh process on the quickstart's model (bundled SmolLM2-135M with its LoRA adapter)
and one client's batch of 8 built-in examples, and reports its peak resident memory (``ru_maxrss``)
after loading and after the work:

- ``inference``: forward passes on the batch under ``torch.no_grad`` (what evaluating it costs);
- ``zeroth_order``: ZO-SGD steps (``client/zeroth_order.py``: two forward passes and three in-place moves
  along a regenerated direction each);
- ``backprop``: the quickstart's own local steps (AdamW, fused loss).

The work's own peak is the peak minus the footprint after loading; the ratio the issue asks for is the
zeroth-order client's whole peak over the inference pass's whole peak (the model included in both).

    python benchmarks/zo_memory.py [--steps 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys

from common import write_result

MODES = ("inference", "zeroth_order", "backprop")


def _child(mode: str, steps: int) -> None:
    import tempfile

    import torch

    from fedtune.assembly import build_client_data, build_workbench, plan_of
    from fedtune.client.trainer import LocalTrainer
    from fedtune.client.zeroth_order import mean_loss
    from fedtune.config import load_config
    from fedtune.data.prepare import prepare_federated_data
    from fedtune.data.tokenize import collate

    torch.set_num_threads(1)
    extra = ["training.gradient=zeroth_order", "training.lr=1e-3"] if mode == "zeroth_order" else []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config("examples/quickstart.yaml", [f"output.dir={tmp}", f"training.local_steps={steps}", *extra])
        plan = plan_of(cfg)
        bench = build_workbench(cfg, plan, announce=False)
        data = build_client_data(prepare_federated_data(cfg.data, cfg.partition, cfg.split_seed()), bench.encoder, cfg)
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    client = data[0]
    if mode == "inference":
        batch = collate(client.train[: cfg.training.batch_size], bench.tokenizer.pad_token_id)
        for _ in range(2 * steps):
            mean_loss(bench.adapter.model, batch)
    else:
        trainer = LocalTrainer(cfg.training, cfg.federation.rounds, cfg.seed, bench.tokenizer.pad_token_id)
        trainer.train(bench.adapter, 0, 1, client)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"loaded": loaded, "peak": peak}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", choices=MODES)
    args = ap.parse_args()
    if args.child:
        _child(args.child, args.steps)
        return
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            cmd = [sys.executable, __file__, "--child", mode, "--steps", str(args.steps)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            runs[mode].append(json.loads(out))
    peak = {m: statistics.median(r["peak"] for r in runs[m]) for m in MODES}
    work = {m: statistics.median(r["peak"] - r["loaded"] for r in runs[m]) for m in MODES}
    payload = {
        "steps": args.steps,
        "repeats": args.repeats,
        "runs": runs,
        "peak_median_bytes": peak,
        "work_median_bytes": work,
        "zo_over_inference": peak["zeroth_order"] / peak["inference"],
        "backprop_over_inference": peak["backprop"] / peak["inference"],
    }
    write_result("zo_memory", payload)
    print(json.dumps({k: v for k, v in payload.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
    main()
