"""Joint training (runtime.joint_clients) against clients in turn and in lanes: one round of K clients.

Bundled SmolLM2-135M-Instruct with the quickstart's LoRA (r=8 on q, k, v, o); K = 4 clients of the
built-in data (iid), each training --steps steps at batch 4 from the same global adapter. Each
variant is fedtune's own in-process runtime serving the same K train requests:
  in-turn   one lane, clients one after another on all torch threads (runtime.lanes=1)
  joint     one lane, all K clients in one forward/backward a micro-batch (runtime.joint_clients=K)
  lanes     two forked 1-thread lanes, clients side by side (the CPU default; skipped on a GPU)
A round's seconds are timed around the runtime's send_and_receive, so they include decoding the
request and encoding the update. The variants run in rotated order within each repeat, after one
untimed warm-up round each. Each client's update from the joint round is checked against its
update from the in-turn round (largest relative difference of any tensor).

    python benchmarks/multi_adapter.py [--clients 4] [--steps 5] [--repeats 3] [--model smollm2-135m] [--device auto]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import interval, write_result

from fedtune.assembly import build_client_data, build_workbench, make_handler, plan_of
from fedtune.config import load_config
from fedtune.core.types import Envelope
from fedtune.data.prepare import prepare_federated_data
from fedtune.models.device import model_device
from fedtune.paradigms.parameter_sharing.messages import TrainReply, TrainRequest
from fedtune.runtime.in_process import InProcessRuntime
from fedtune.wire.link import Link
from fedtune.wire.messages import decode_message, encode_message


def runtimes(handler, k: int, gpu: bool) -> dict[str, InProcessRuntime]:
    pool = {
        "in-turn": InProcessRuntime(handler.handle),
        "joint": InProcessRuntime(handler.handle, many=handler.handle_many, group=k),
    }
    if not gpu:  # lanes are forked processes: not with CUDA
        pool["lanes"] = InProcessRuntime(handler.handle, lanes=2)
    return pool


def one_round(rt: InProcessRuntime, envelopes: list[Envelope]) -> tuple[float, list[TrainReply]]:
    t = time.perf_counter()
    replies = rt.send_and_receive(envelopes)
    seconds = time.perf_counter() - t
    assert len(replies) == len(envelopes), "a client was dropped"
    return seconds, [decode_message(e.payload, TrainReply) for e in replies]


def largest_rel_diff(a: list[TrainReply], b: list[TrainReply], names: list[str]) -> float:
    link, worst = Link(), 0.0
    for x, y in zip(a, b, strict=True):
        dx, dy = link.decode(x.delta, names), link.decode(y.delta, names)
        for n in names:
            worst = max(worst, float((dx[n] - dy[n]).norm() / dy[n].norm().clamp_min(1e-30)))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="smollm2-135m", help="model.name (tiny-llama: a quick check of the script)")
    ap.add_argument("--device", default="auto", help="model.device: auto (a GPU where there is one), cpu, cuda")
    args = ap.parse_args()
    k = args.clients
    overrides = [
        f"model.name={args.model}",
        f"model.device={args.device}",
        "partition.method=iid",
        f"partition.num_clients={k}",
        "data.max_seq_len=128",
        f"training.local_steps={args.steps}",
        "training.batch_size=4",
        f"runtime.joint_clients={k}",
        "runtime.lanes=1",
        "output.progress=false",
    ]
    cfg = load_config("examples/quickstart.yaml", overrides)
    plan = plan_of(cfg)
    bench = build_workbench(cfg, plan)
    data = build_client_data(prepare_federated_data(cfg.data, cfg.partition, cfg.split_seed()), bench.encoder, cfg)
    handler = make_handler(plan, bench, data)
    names = list(bench.initial)
    wire = bench.downlink.encode(bench.initial, {}, torch.Generator())[0]
    request = encode_message(TrainRequest(round=1, params=wire))
    envelopes = [Envelope(c, request) for c in range(k)]
    device = model_device(bench.adapter.model)
    pool = runtimes(handler, k, device.type == "cuda")
    order = list(pool)
    replies = {name: one_round(rt, envelopes)[1] for name, rt in pool.items()}  # warm-up, and the updates
    rel = largest_rel_diff(replies["joint"], replies["in-turn"], names)
    lanes_rel = largest_rel_diff(replies["lanes"], replies["in-turn"], names) if "lanes" in replies else None
    tokens = sum(r.trained_tokens for r in replies["in-turn"])
    seconds: dict[str, list[float]] = {name: [] for name in order}
    for rep in range(args.repeats):
        for name in order[rep % len(order) :] + order[: rep % len(order)]:
            seconds[name].append(one_round(pool[name], envelopes)[0])
    for rt in pool.values():
        rt.close()
    rows = []
    for name in order:
        mean, half = interval(seconds[name])
        speedups = [b / t for b, t in zip(seconds["in-turn"], seconds[name], strict=True)]  # within each repeat
        s_mean, s_half = interval(speedups)
        rows.append(
            {
                "variant": name,
                "s_per_round": round(mean, 2),
                "s_per_round_pm": round(half, 2),
                "tokens_per_s": round(tokens / statistics.fmean(seconds[name]), 1),
                "speedup": round(s_mean, 3),
                "speedup_pm": round(s_half, 3),
                "runs": [round(t, 2) for t in seconds[name]],
            }
        )
        print(rows[-1])
    setup = {
        "model": cfg.model.name,
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "clients": k,
        "batch_per_client": 4,
        "steps": args.steps,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "trained_tokens_per_round": tokens,
        "joint_vs_in_turn_max_rel_diff": rel,
        "lanes_vs_in_turn_max_rel_diff": lanes_rel,
    }
    write_result("multi_adapter", {**setup, "rows": rows})


if __name__ == "__main__":
    main()
