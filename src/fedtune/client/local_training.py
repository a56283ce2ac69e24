"""One readable local-training loop: AdamW on the adapter, gradient accumulation, a position-mean loss.

The loss of an optimizer step is the mean over all target tokens of its micro-batches (not
a mean of per-batch means), so accumulation gives the same gradient as one big batch.
A non-finite loss stops training at once and marks the result diverged.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fedtune.client.corrections import Correction
from fedtune.client.cost import ActivationMeter, FlopModel
from fedtune.data.tokenize import IGNORE
from fedtune.losses import LossFn, token_loss_sum


@dataclass(frozen=True)
class LocalResult:
    steps: int
    mean_loss: float  # token-weighted mean training loss over the round
    tokens: int
    train_s: float
    diverged: bool = False
    error: str | None = None
    lr_sum: float = 0.0  # sum of the learning rates of the steps taken (SCAFFOLD's path length)
    flops: float = 0.0  # analytic training FLOPs of the micro-batches run (client.cost); 0 if unknown
    peak_activation_bytes: int = 0  # the most bytes autograd kept for backward at once (client.cost)


def make_optimizer(name: str, params: Sequence[torch.nn.Parameter], lr: float, weight_decay: float):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"training.optimizer={name!r}; allowed: adamw, sgd")


def train_locally(
    model: torch.nn.Module,
    params: Sequence[torch.nn.Parameter],
    micro_batches: Sequence[dict[str, torch.Tensor]],
    grad_accum: int,
    lr_at: Callable[[int], float],
    weight_decay: float = 0.0,
    max_grad_norm: float | None = None,
    on_step: Callable[[int, float], None] | None = None,
    optimizer: str = "adamw",
    corrections: Sequence[Correction] = (),
    loss: LossFn = token_loss_sum,
    cost: FlopModel | None = None,
) -> LocalResult:
    """Run ceil(len(micro_batches) / grad_accum) optimizer steps; return loss and timing.

    ``loss(model, batch) -> (sum over target positions, their count)``: response-only cross-entropy
    by default, KL to a teacher for distillation. Each step's loss is the sum over its micro-batches
    divided by their target positions, so accumulation gives the gradient of one big batch.
    ``cost``: the model's FLOP model, to count the FLOPs run (client.cost); activations are always measured.
    """
    start = time.perf_counter()
    model.train()
    opt = make_optimizer(optimizer, params, lr_at(0), weight_decay)
    groups = [micro_batches[i : i + grad_accum] for i in range(0, len(micro_batches), grad_accum)]
    loss_total, tokens_total, lr_sum, flops = 0.0, 0, 0.0, 0.0
    meter = ActivationMeter(model.parameters())
    for step, group in enumerate(groups):
        lr = lr_at(step)
        for g in opt.param_groups:
            g["lr"] = lr
        n_tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in group)
        step_loss = 0.0
        for batch in group:
            with meter.measure():
                loss_sum, _ = loss(model, batch)
            flops += cost.training(batch) if cost is not None else 0.0
            if not torch.isfinite(loss_sum):
                return LocalResult(
                    step,
                    math.nan,
                    tokens_total,
                    time.perf_counter() - start,
                    True,
                    f"non-finite loss ({loss_sum.item()}) at local step {step}",
                    lr_sum,
                    flops,
                    meter.peak,
                )
            (loss_sum / max(1, n_tokens)).backward()
            step_loss += loss_sum.item()
        for corr in corrections:
            extra = corr.extra_loss(params)
            if extra is not None:
                extra.backward()
            corr.adjust_grads(params)
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        for corr in corrections:
            corr.after_step(params, lr)
        loss_total += step_loss
        tokens_total += n_tokens
        lr_sum += lr
        if on_step is not None:
            on_step(step, step_loss / max(1, n_tokens))
    model.eval()
    mean = loss_total / max(1, tokens_total)
    return LocalResult(
        len(groups),
        mean,
        tokens_total,
        time.perf_counter() - start,
        lr_sum=lr_sum,
        flops=flops,
        peak_activation_bytes=meter.peak,
    )
