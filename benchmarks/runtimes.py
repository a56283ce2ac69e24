"""fedtune's simulation runtimes vs Flower's simulation engine running a FlowerTune-style app.

One job for every variant: LoRA r=8 on q,k,v,o averaged factor by factor (what FedAvg does to
LoRA arrays in a FlowerTune app), N clients (iid split of the built-in tasks),
3 rounds of 5 local steps at batch 4, every client every round, FedAvg.
  fedtune-in_process  `run_experiment` with the default runtime: one model, clients in lanes
                      (runtime.lanes=auto: one forked lane per core, 1 torch thread each)
  fedtune-ray         runtime.name=ray: 2 workers x 1 CPU, one model each
  flower-sim          flwr `run_simulation` (Ray backend, 2 actors x 1 CPU) with the FlowerTune
                      pattern: each client call builds its model and LoRA adapter, loads its data
                      partition, trains, and returns the LoRA state as arrays; FedAvg strategy.
All three train with the same local-training code and data, so the difference is the framework.
Each variant runs in its own process; wall time covers the whole job (imports, start-up, rounds);
peak memory is the largest sum over that process and all its descendants (Ray's daemons and
workers included) of PSS, each shared page split between the processes that map it (RSS, which
counts a shared page once per process, is kept alongside), sampled every 0.5 s.

Before the variants, a probe measures this machine's fp32 matmul throughput (2048^3 products for
about 3 s): one process with every core's thread, and one 1-thread process per core at once. A
fedtune variant's training throughput is its clients' analytic FLOPs over the rounds' training
wall time, set against the second (the most these cores did on matmuls alone). fedtune's analytic
count (``client_flops``) takes training as 3 forward passes, the usual rule when every weight
trains; with a frozen base, backward computes input gradients only, so about 2 forward passes
run: ``train_gflops_executed`` is 2/3 of the analytic rate, and ``train_vs_matmul`` uses it.

    python benchmarks/runtimes.py [--clients 8 32] [--model tiny-llama] [--only VARIANT ...] [--tag TAG]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

from common import merge_rows, run_measured, write_result

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


def _matmul_gflops(threads: int, seconds: float, out) -> None:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b  # warm-up
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        a @ b
        n += 1
    out.put(2 * 2048**3 * n / (time.perf_counter() - t) / 1e9)


def matmul_probe(seconds: float = 3.0) -> dict:
    """fp32 matmul GFLOP/s: one process with a thread per core; one 1-thread process per core at once (summed)."""
    ctx, cores = mp.get_context("spawn"), len(os.sched_getaffinity(0))
    out = {}
    for name, procs, threads in (("one_process", 1, cores), ("process_per_core", cores, 1)):
        q = ctx.Queue()
        ps = [ctx.Process(target=_matmul_gflops, args=(threads, seconds, q)) for _ in range(procs)]
        for p in ps:
            p.start()
        out[f"matmul_gflops_{name}"] = round(sum(q.get() for _ in ps), 1)
        for p in ps:
            p.join()
    return out


def run_variant(variant: str, model: str, clients: int) -> dict:
    """Run one variant in a child process; wall time and peak PSS (and RSS) of its whole process tree."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, __file__, "--child", variant, "--model", model, "--clients", str(clients), "--out", out]
        run = run_measured(cmd)
        if run.returncode != 0:
            raise RuntimeError(f"{variant} N={clients} failed:\n{run.output[-3000:]}")
        result = json.loads(run.output.strip().splitlines()[-1])
    return {
        "variant": variant,
        "clients": clients,
        "wall_s": round(run.wall_s, 2),
        "peak_pss_gb": round(run.peak_pss / 2**30, 3),
        "peak_rss_gb": round(run.peak_rss / 2**30, 3),
        **result,
    }


def child(variant: str, model: str, clients: int, out: str) -> None:
    from fedtune.config import load_config

    cfg = load_config("examples/tiny.yaml", job_overrides(model, clients, out))
    if variant.startswith("fedtune"):
        from fedtune.experiment import run_experiment

        cfg = cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"name": variant.split("-")[1]})})
        history = run_experiment(cfg).state.history[1:]
        flops, train_s = sum(h["client_flops"] for h in history), sum(h["train_s"] for h in history)
        tokens = sum(h["train_tokens"] for h in history)
        print(
            json.dumps(
                {
                    "train_loss": [round(h["train_loss"], 6) for h in history],
                    "train_s": round(train_s, 2),
                    "train_tokens_per_s": round(tokens / train_s, 1),
                    "train_gflops": round(flops / train_s / 1e9, 1),
                }
            )
        )
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
    ap.add_argument("--tag", help="write results/runtimes[-model]-TAG.json (repeated runs side by side)")
    ap.add_argument("--child")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.model, args.clients[0], args.out)
        return
    probe = matmul_probe()
    print(probe, flush=True)
    rows = []
    for n in args.clients:
        for variant in args.only:
            row = run_variant(variant, args.model, n)
            print(row, flush=True)
            rows.append(row)
    name = "runtimes" if args.model == "tiny-llama" else f"runtimes-{args.model}"
    name += f"-{args.tag}" if args.tag else ""
    order = [f"{v}/{n}" for n in (8, 32, *args.clients) for v in VARIANTS]
    for r in rows:
        r["key"] = f"{r['variant']}/{r['clients']}"
        if "train_gflops" in r:  # fedtune's analytic count is 3 forward passes; a frozen base runs about 2
            r["train_gflops_executed"] = round(r["train_gflops"] * 2 / 3, 1)
            r["train_vs_matmul"] = round(r["train_gflops_executed"] / probe["matmul_gflops_process_per_core"], 3)
    rows = merge_rows(name, rows, "key", list(dict.fromkeys(order)))
    setup = {"model": args.model, "rounds": ROUNDS, "local_steps": STEPS, "batch_size": BATCH, **probe}
    write_result(name, {**setup, "rows": rows})


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
