"""A LoRA client on a quantised base (model.quantization) against one on the full base: memory, time, loss.

Each base runs in a fresh process on the quickstart's setup (bundled SmolLM2-135M, its LoRA adapter, one
client's data) and reports:

- ``held``: resident memory once the model is loaded (CPU: VmRSS; loading's own transient peak, a float32
  copy of each weight before it is quantised, is left out by resetting the high-water mark), and ``peak``:
  the most resident through ``--steps`` local training steps (VmHWM after the reset); on ``--device cuda``
  allocated GPU memory, after loading and at its peak;
- ``step_s``: the round's training seconds per step;
- ``base_loss``: the base model's mean loss on the client's first batch (what quantising the base costs
  before any training), and ``trained_loss``: the round's mean training loss.

    python benchmarks/qlora.py [--steps 5] [--repeats 2] [--device cpu|cuda] [--model NAME]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from common import write_result

BASES = ("none", "nf4", "int8")


def _child(kind: str, steps: int, device: str, model: str | None) -> None:
    import gc
    import tempfile
    import time

    import torch

    from fedtune.assembly import build_client_data, build_workbench, plan_of
    from fedtune.client.trainer import LocalTrainer
    from fedtune.client.zeroth_order import mean_loss
    from fedtune.config import load_config
    from fedtune.data.prepare import prepare_federated_data
    from fedtune.data.tokenize import collate

    if device == "cpu":
        torch.set_num_threads(1)
    extra = [f"model.quantization={kind}", f"model.device={device}"] + ([f"model.name={model}"] if model else [])
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config("examples/quickstart.yaml", [f"output.dir={tmp}", f"training.local_steps={steps}", *extra])
        plan = plan_of(cfg)
        bench = build_workbench(cfg, plan, announce=False)
        data = build_client_data(prepare_federated_data(cfg.data, cfg.partition, cfg.split_seed()), bench.encoder, cfg)
    load_s = time.perf_counter() - start

    def status(field: str) -> int:  # kB in /proc/self/status
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(field)

    gc.collect()
    if device == "cpu":
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark: what follows is training's peak
        loaded = status("VmRSS")
    else:
        torch.cuda.reset_peak_memory_stats()
        loaded = torch.cuda.memory_allocated()

    def peak() -> int:
        return status("VmHWM") if device == "cpu" else torch.cuda.max_memory_allocated()

    client = data[0]
    where = next(bench.adapter.model.parameters()).device
    batch = {
        k: v.to(where)
        for k, v in collate(client.train[: cfg.training.batch_size], bench.tokenizer.pad_token_id).items()
    }
    base_loss, _ = mean_loss(bench.adapter.model, batch)
    trainer = LocalTrainer(cfg.training, cfg.federation.rounds, cfg.seed, bench.tokenizer.pad_token_id)
    out = trainer.train(bench.adapter, 0, 1, client)
    print(
        json.dumps(
            {
                "held": loaded,
                "peak": peak(),
                "load_s": load_s,
                "step_s": out.result.train_s / max(1, out.result.steps),
                "base_loss": base_loss,
                "trained_loss": out.result.mean_loss,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default=None, help="model.name (default: the quickstart's)")
    ap.add_argument("--child", choices=BASES)
    args = ap.parse_args()
    if args.child:
        _child(args.child, args.steps, args.device, args.model)
        return
    runs: dict[str, list[dict]] = {b: [] for b in BASES}
    refused: dict[str, str] = {}
    for _ in range(args.repeats):
        for kind in BASES:
            if kind in refused:
                continue
            cmd = [sys.executable, __file__, "--child", kind, "--steps", str(args.steps), "--device", args.device]
            cmd += ["--model", args.model] if args.model else []
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:  # a base this machine cannot run: its reason is the result
                refused[kind] = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
                continue
            runs[kind].append(json.loads(done.stdout.strip().splitlines()[-1]))
    med = {b: {k: statistics.median(r[k] for r in runs[b]) for k in runs[b][0]} for b in BASES if runs[b]}
    payload = {
        "device": args.device,
        "steps": args.steps,
        "repeats": args.repeats,
        "runs": runs,
        "median": med,
        "refused": refused,
        "peak_over_full": {b: med[b]["peak"] / med["none"]["peak"] for b in med if "none" in med},
        "held_over_full": {b: med[b]["held"] / med["none"]["held"] for b in med if "none" in med},
        "step_s_over_full": {b: med[b]["step_s"] / med["none"]["step_s"] for b in med if "none" in med},
    }
    write_result(f"qlora_{args.device.split(':')[0]}", payload)
    print(json.dumps({k: v for k, v in payload.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
    main()
