"""fedtune's simulation runtimes vs Flower's simulation engine running a FlowerTune-style app.

One job for every variant: LoRA r=8 on q,k,v,o averaged factor by factor (what FedAvg does to
LoRA arrays in a FlowerTune app), N clients (iid split of the built-in tasks),
3 rounds of 5 local steps at batch 4, every client every round, FedAvg.
  fedtune-in_process  `run_experiment` with the default runtime: one model, clients in turn
  fedtune-ray         runtime.name=ray: 2 workers x 1 CPU, one model each
  flower-sim          flwr `run_simulation` (Ray backend, 2 actors x 1 CPU) with the FlowerTune
                      pattern: each client call builds its model and LoRA adapter, loads its data
                      partition, trains, and returns the LoRA state as arrays; FedAvg strategy.
All three train with the same local-training code and data, so the difference is the framework.
Each variant runs in its own process; wall time covers the whole job (imports, start-up, rounds);
peak memory is the largest sum of RSS over that process and all its descendants (Ray's daemons
and workers included; shared pages count once per process), sampled every 0.2 s.

    python benchmarks/runtimes.py [--clients 8 32] [--model tiny-llama] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from common import merge_rows, write_result

VARIANTS = ("fedtune-in_process", "fedtune-ray", "flower-sim")
ROUNDS, STEPS, BATCH = 3, 5, 4


def job_overrides(model: str, clients: int, out: str) -> list[str]:
    return [
        f"model.name={model}",
        "adapter.target_modules=[q_proj,k_proj,v_proj,o_proj]",
        "aggregation.lora=naive",  # what FedAvg over LoRA arrays does in a FlowerTune app
        "data.builtin.train_per_task=64",
        "data.max_seq_len=128",
        "partition.method=iid",
        f"partition.num_clients={clients}",
        f"federation.rounds={ROUNDS}",
        f"training.local_steps={STEPS}",
        f"training.batch_size={BATCH}",
        "evaluation.every=0",
        "evaluation.at_start=false",
        "evaluation.max_samples=4",
        "evaluation.exact_match=false",
        f"output.dir={out}",
        "output.progress=false",
    ]


def run_variant(variant: str, model: str, clients: int) -> dict:
    """Run one variant in a child process; wall time and peak RSS of its whole process tree."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, __file__, "--child", variant, "--model", model, "--clients", str(clients), "--out", out]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        root, peak = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
                peak = max(peak, sum(_rss(p) for p in tree))
            except psutil.NoSuchProcess:
                pass
            time.sleep(0.2)
        wall = time.perf_counter() - start
        output = proc.stdout.read()
        if proc.returncode != 0:
            raise RuntimeError(f"{variant} N={clients} failed:\n{output[-3000:]}")
        result = json.loads(output.strip().splitlines()[-1])
    return {
        "variant": variant,
        "clients": clients,
        "wall_s": round(wall, 2),
        "peak_rss_gb": round(peak / 2**30, 3),
        **result,
    }


def _rss(p: psutil.Process) -> int:
    try:
        return p.memory_info().rss
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0


def child(variant: str, model: str, clients: int, out: str) -> None:
    from fedtune.config import load_config

    cfg = load_config("examples/tiny.yaml", job_overrides(model, clients, out))
    if variant.startswith("fedtune"):
        from fedtune.experiment import run_experiment

        cfg = cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"name": variant.split("-")[1]})})
        history = run_experiment(cfg).state.history
        print(json.dumps({"train_loss": [round(h["train_loss"], 6) for h in history[1:]]}))
        return
    os.environ["FEDTUNE_BENCH_CONFIG"] = cfg.model_dump_json()
    import flower_sim_app
    from flwr.simulation import run_simulation

    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}}
    run_simulation(flower_sim_app.server_app, flower_sim_app.client_app, clients, backend_config=backend)
    print(json.dumps({"train_loss": [round(x, 6) for x in flower_sim_app.LOSSES]}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--only", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--child")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.model, args.clients[0], args.out)
        return
    rows = []
    for n in args.clients:
        for variant in args.only:
            row = run_variant(variant, args.model, n)
            print(row, flush=True)
            rows.append(row)
    name = "runtimes" if args.model == "tiny-llama" else f"runtimes-{args.model}"
    order = [f"{v}/{n}" for n in (8, 32, *args.clients) for v in VARIANTS]
    for r in rows:
        r["key"] = f"{r['variant']}/{r['clients']}"
    rows = merge_rows(name, rows, "key", list(dict.fromkeys(order)))
    write_result(name, {"model": args.model, "rounds": ROUNDS, "local_steps": STEPS, "batch_size": BATCH, "rows": rows})


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
