"""Multi-adapter batched training on CPU: K clients' LoRA adapters in one forward/backward, or one at a time?

Bundled SmolLM2-135M-Instruct, frozen; K = 4 clients, each with its own LoRA (r=8 on q,k,v,o) and
its own batch of 4 built-in examples (iid split). Every targeted Linear computes
base(x) + s * B_k A_k x for the rows of client k: one call over all K clients' rows
(``batched``: the rows padded to the longest of all K batches, two ``bmm`` for the K adapters) or
one client at a time (``sequential``: each batch padded to its own longest row). Both minimise
the sum over clients of each client's mean token loss, so each client's gradients are the same up
to float order: checked every run (largest relative difference per tensor).

Variants, each timed over the same --steps steps after a warm-up step (seconds per step: mean):
  sequential-2t   one process, 2 torch threads, clients in turn (fedtune with runtime.lanes=1)
  batched-2t      one process, 2 torch threads, all K clients in one forward/backward
  sequential-lanes  two forked 1-thread processes, K/2 clients each in turn (fedtune's default lanes)
  batched-lanes   two forked 1-thread processes, each batching its K/2 clients

    python benchmarks/multi_adapter.py [--clients 4] [--steps 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import statistics
import time

import torch
import torch.nn.functional as F
from common import interval, write_result

from fedtune.assembly import build_client_data
from fedtune.config import load_config
from fedtune.data.prepare import prepare_federated_data
from fedtune.data.templates import resolve_template
from fedtune.data.tokenize import IGNORE, Encoder, collate
from fedtune.models.loading import load_model

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class MultiLoRA(torch.nn.Module):
    """K LoRA adapters over one frozen Linear; rows of client k (contiguous, equal blocks) use adapter k."""

    def __init__(self, base: torch.nn.Linear, k: int, r: int, alpha: float, gen: torch.Generator):
        super().__init__()
        self.base, self.scale = base, alpha / r
        fan_in, fan_out = base.in_features, base.out_features
        self.A = torch.nn.Parameter(torch.randn(k, r, fan_in, generator=gen) / math.sqrt(fan_in))  # (K, r, in)
        self.B = torch.nn.Parameter(torch.randn(k, fan_out, r, generator=gen) * 0.01)  # (K, out, r)
        self.only: int | None = None  # one client's adapter for every row (sequential)
        self.first = 0  # adapters first..first+groups-1 serve the row blocks (batched)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (N, T, in)
        y = self.base(x)  # (N, T, out)
        if self.only is not None:
            return y + self.scale * (x @ self.A[self.only].T) @ self.B[self.only].T
        n, t, _ = x.shape
        groups = GROUPS[0]
        a, b = self.A[self.first : self.first + groups], self.B[self.first : self.first + groups]
        xg = x.reshape(groups, n // groups * t, -1)  # (G, rows*T, in)
        d = torch.bmm(torch.bmm(xg, a.transpose(1, 2)), b.transpose(1, 2))  # (G, rows*T, out)
        return y + self.scale * d.reshape(n, t, -1)


GROUPS = [1]  # how many clients' row blocks the current batched call holds


def attach(model: torch.nn.Module, k: int) -> list[MultiLoRA]:
    gen = torch.Generator().manual_seed(0)
    layers = []
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if child_name in TARGETS and isinstance(child, torch.nn.Linear):
                lora = MultiLoRA(child, k, 8, 16, gen)
                setattr(module, child_name, lora)
                layers.append(lora)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers:
        layer.A.requires_grad_(True)
        layer.B.requires_grad_(True)
    return layers


def mean_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor], groups: int) -> torch.Tensor:
    """Σ over the row blocks of each block's mean next-token loss (what K separate clients minimise)."""
    targets = batch["labels"][:, 1:]  # (N, T-1)
    keep = (targets != IGNORE).any(dim=0).nonzero().squeeze(1)  # (P,)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    tgt = targets[:, keep]  # (N, P)
    per = F.cross_entropy(logits.float().transpose(1, 2), tgt, ignore_index=IGNORE, reduction="none")  # (N, P)
    n = per.shape[0] // groups
    total = per.new_zeros(())
    for g in range(groups):
        rows = slice(g * n, (g + 1) * n)
        total = total + per[rows].sum() / (tgt[rows] != IGNORE).sum()
    return total


def step(model, layers, batches: list[list], pad: int, first: int, batched: bool) -> None:
    """Forward and backward for clients first..first+len(batches)-1, batched or in turn."""
    if batched:
        GROUPS[0] = len(batches)
        for layer in layers:
            layer.only, layer.first = None, first
        mean_losses(model, collate([e for b in batches for e in b], pad), len(batches)).backward()
        return
    for i, b in enumerate(batches):
        for layer in layers:
            layer.only = first + i
        mean_losses(model, collate(b, pad), 1).backward()


def grads(layers) -> list[torch.Tensor]:
    return [t.grad.clone() for layer in layers for t in (layer.A, layer.B)]


def zero(layers) -> None:
    for layer in layers:
        layer.A.grad = layer.B.grad = None


def timed(model, layers, plan, pad, first: int, batched: bool) -> list[float]:
    times = []
    for batches in plan:
        zero(layers)
        t = time.perf_counter()
        step(model, layers, batches, pad, first, batched)
        times.append(time.perf_counter() - t)
    return times


def lane(model, layers, plan, pad, first: int, batched: bool, out) -> None:
    torch.set_num_threads(1)
    out.put(timed(model, layers, plan, pad, first, batched))


def measure(model, layers, plan, pad, k: int, steps: int) -> dict[str, float]:
    """Seconds per step of each variant, in one pass."""
    out = {}
    torch.set_num_threads(2)
    for name, batched in (("sequential-2t", False), ("batched-2t", True)):
        out[name] = statistics.fmean(timed(model, layers, plan, pad, 0, batched)[1:])
    half = k // 2
    ctx = mp.get_context("fork")  # the parent used 2 threads: each child runs 1 (see fedtune.runtime.lanes)
    for name, batched in (("sequential-lanes", False), ("batched-lanes", True)):
        q = ctx.Queue()
        shares = [[p[i * half : (i + 1) * half] for p in plan] for i in range(2)]
        procs = [ctx.Process(target=lane, args=(model, layers, shares[i], pad, i * half, batched, q)) for i in range(2)]
        for p in procs:
            p.start()
        per_lane = [q.get() for _ in procs]
        for p in procs:
            p.join()
        out[name] = max(sum(t[1:]) for t in per_lane) / steps  # the slower lane's time, per step
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    k = args.clients
    cfg = load_config(
        "examples/quickstart.yaml",
        ["partition.method=iid", f"partition.num_clients={k}", "data.max_seq_len=128", "output.progress=false"],
    )
    loaded = load_model(cfg.model.name)  # a plain model: our own K adapters go on it
    model, tokenizer = loaded.model, loaded.tokenizer
    d = cfg.data
    encoder = Encoder(tokenizer, resolve_template(d.template, tokenizer), d.system_prompt, d.max_seq_len)
    data = prepare_federated_data(cfg.data, cfg.partition, cfg.split_seed())
    clients = build_client_data(data, encoder, cfg)
    pad = tokenizer.pad_token_id
    layers = attach(model, k)
    b = 4
    plan = [[clients[c].train[s * b : (s + 1) * b] for c in range(k)] for s in range(args.steps + 1)]
    tokens = [sum(len(e.input_ids) for batch in p for e in batch) for p in plan]  # real (unpadded) tokens

    # exactness: one step's gradients both ways
    zero(layers)
    step(model, layers, plan[0], pad, 0, batched=False)
    seq = grads(layers)
    zero(layers)
    step(model, layers, plan[0], pad, 0, batched=True)
    bat = grads(layers)
    rel = max(float((x - y).norm() / y.norm().clamp_min(1e-30)) for x, y in zip(bat, seq, strict=True))

    results: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for name, seconds in measure(model, layers, plan, pad, k, args.steps).items():
            results.setdefault(name, []).append(seconds)
    tok = statistics.median(tokens[1:])
    rows = []
    for n, runs in results.items():
        mean, half = interval(runs)
        speedups = [b / t for b, t in zip(results["sequential-2t"], runs, strict=True)]  # within each repeat
        s_mean, s_half = interval(speedups)
        rows.append(
            {
                "variant": n,
                "s_per_step": round(mean, 3),
                "s_per_step_pm": round(half, 3),
                "tokens_per_s": round(tok / mean, 1),
                "speedup": round(s_mean, 3),
                "speedup_pm": round(s_half, 3),
                "runs": [round(t, 3) for t in runs],
            }
        )
    for r in rows:
        print(r)
    setup = {
        "clients": k,
        "batch_per_client": b,
        "steps": args.steps,
        "repeats": args.repeats,
        "max_grad_rel_diff": rel,
    }
    write_result("multi_adapter", {**setup, "rows": rows})


if __name__ == "__main__":
    main()
