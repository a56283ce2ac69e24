"""Several clients' local training in one forward/backward a micro-batch, each with its own optimizer.

The clients' micro-batches are stacked (``data.tokenize.stack_collated``) and their LoRA rows
routed to each one's tensors (``adapters.routed_lora``). The backward runs once on
Σ_k loss_k / n_k, whose gradient in client k's tensors is that of its own step loss alone; each
client then takes its own corrections, clipping and optimizer step. So each client's round is the
one ``local_training.train_locally`` runs for it alone, up to float order (rows padded to a
longer width, matrices of more rows), and its ``LocalResult`` counts its own steps, tokens and
FLOPs; time and kept activations are those of the joint pass, which every member shares.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fedtune.adapters.routed_lora import RoutedLoRA
from fedtune.client.corrections import Correction
from fedtune.client.cost import ActivationMeter, FlopModel, input_tokens
from fedtune.client.local_training import LocalResult, finished, make_optimizer, optimizer_step, target_count
from fedtune.data.tokenize import stack_collated
from fedtune.losses import block_loss_sums


@dataclass
class JointClient:
    """One client's part of a joint round."""

    tensors: dict[str, torch.nn.Parameter]  # the leaves it trains, by adapter state name (RoutedLoRA.leaves)
    batches: Sequence[dict[str, torch.Tensor]]  # its micro-batches, in order
    lr_at: Callable[[int], float]
    corrections: Sequence[Correction] = ()


@dataclass
class _Tally:
    loss: float = 0.0
    tokens: int = 0
    lr_sum: float = 0.0
    flops: float = 0.0
    fed: int = 0
    failed: LocalResult | None = None  # set when its loss stopped being finite


def train_jointly(
    model: torch.nn.Module,
    routing: RoutedLoRA,
    clients: Sequence[JointClient],
    grad_accum: int,
    pad_id: int,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = None,
    optimizer: str = "adamw",
    fused: bool = True,
    cost: FlopModel | None = None,
    on_step: Callable[[int], None] | None = None,
) -> list[LocalResult]:
    """Train every client's tensors for its own ceil(len(batches) / grad_accum) steps; one result each.

    Step s's micro-batch j of every client that has one runs in one forward. A client whose loss is
    not finite stops there (diverged, as alone) and leaves the others' gradients untouched: its term
    never enters the backward, and rows do not mix."""
    start = time.perf_counter()
    model.train()
    params = [list(c.tensors.values()) for c in clients]
    opts = [make_optimizer(optimizer, p, c.lr_at(0), weight_decay) for p, c in zip(params, clients, strict=True)]
    groups = [[c.batches[i : i + grad_accum] for i in range(0, len(c.batches), grad_accum)] for c in clients]
    tally = [_Tally() for _ in clients]
    meter = ActivationMeter([*model.parameters(), *(t for p in params for t in p)])
    for step in range(max(map(len, groups), default=0)):
        active = [k for k, g in enumerate(groups) if step < len(g) and tally[k].failed is None]
        lr = {k: clients[k].lr_at(step) for k in active}
        n_tokens = {k: target_count(groups[k][step]) for k in active}
        step_loss = dict.fromkeys(active, 0.0)
        for j in range(grad_accum):
            members = [k for k in active if j < len(groups[k][step]) and tally[k].failed is None]
            if not members:
                continue
            parts = [groups[k][step][j] for k in members]
            rows = [int(p["input_ids"].shape[0]) for p in parts]
            with routing.route([clients[k].tensors for k in members], rows):
                with meter.measure():
                    sums = block_loss_sums(model, stack_collated(parts, pad_id), rows, fused)
                total = None
                for k, part, (loss_sum, _) in zip(members, parts, sums, strict=True):
                    t = tally[k]
                    t.flops += cost.training(part) if cost is not None else 0.0
                    t.fed += input_tokens(part)
                    if not torch.isfinite(loss_sum):
                        error = f"non-finite loss ({loss_sum.item()}) at local step {step}"
                        elapsed = time.perf_counter() - start
                        t.failed = LocalResult(
                            step, math.nan, t.tokens, elapsed, True, error, t.lr_sum, t.flops, meter.peak
                        )
                        continue
                    term = loss_sum / max(1, n_tokens[k])
                    total = term if total is None else total + term
                    step_loss[k] += loss_sum.item()
                if total is not None:
                    total.backward()  # inside the routing: a checkpointed block recomputes its forward
        for k in active:
            t = tally[k]
            if t.failed is not None:
                continue
            optimizer_step(opts[k], params[k], lr[k], clients[k].corrections, max_grad_norm)
            t.loss += step_loss[k]
            t.tokens += n_tokens[k]
            t.lr_sum += lr[k]
        if on_step is not None:
            on_step(step)
    model.eval()
    return [
        t.failed or finished(len(g), t.loss, t.tokens, start, t.lr_sum, t.flops, meter, t.fed)
        for t, g in zip(tally, groups, strict=True)
    ]
