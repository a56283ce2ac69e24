"""One readable local-training loop: AdamW on the adapter, gradient accumulation, a position-mean loss.

The loss of an optimizer step is the mean over all target tokens of its micro-batches (not
a mean of per-batch means), so accumulation gives the same gradient as one big batch.
A non-finite loss stops training at once and marks the result diverged.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fedtune.client.corrections import Correction
from fedtune.client.cost import ActivationMeter, FlopModel, input_tokens
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
    input_tokens: int = 0  # non-padding input tokens of the micro-batches run (client.cost.input_tokens)


@dataclass(frozen=True)
class DpSgdStep:
    """DP-SGD (Abadi et al. 2016) through Opacus: per-example gradients clipped to ``max_grad_norm``, their sum
    noised with std ``noise_multiplier x max_grad_norm``, divided by the expected batch size (Poisson batches)."""

    noise_multiplier: float
    max_grad_norm: float
    expected_batch_size: float
    generator: torch.Generator  # the noise: seeded by the client's own secret, so a resume replays it


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
    dp: DpSgdStep | None = None,
) -> LocalResult:
    """Run ceil(len(micro_batches) / grad_accum) optimizer steps; return loss and timing.

    ``loss(model, batch) -> (sum over target positions, their count)``: response-only cross-entropy
    by default, KL to a teacher for distillation. Each step's loss is the sum over its micro-batches
    divided by their target positions, so accumulation gives the gradient of one big batch.
    ``cost``: the model's FLOP model, to count the FLOPs run (client.cost); activations are always measured.
    ``dp``: DP-SGD; then each micro-batch is one step (``grad_accum`` 1) and ``loss`` sums per-example means
    (``losses.example_loss_sum``). Opacus's hooks are on the model only for the call.
    """
    if dp is not None:
        return _with_dp_sgd(model, params, micro_batches, lr_at, weight_decay, on_step, optimizer, loss, cost, dp)
    start = time.perf_counter()
    model.train()
    opt = make_optimizer(optimizer, params, lr_at(0), weight_decay)
    groups = [micro_batches[i : i + grad_accum] for i in range(0, len(micro_batches), grad_accum)]
    loss_total, tokens_total, lr_sum, flops, fed = 0.0, 0, 0.0, 0.0, 0
    meter = ActivationMeter(model.parameters())
    for step, group in enumerate(groups):
        lr = lr_at(step)
        n_tokens = target_count(group)
        step_loss = 0.0
        for batch in group:
            with meter.measure():
                loss_sum, _ = loss(model, batch)
            flops += cost.training(batch) if cost is not None else 0.0
            fed += input_tokens(batch)
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
        optimizer_step(opt, params, lr, corrections, max_grad_norm)
        loss_total += step_loss
        tokens_total += n_tokens
        lr_sum += lr
        if on_step is not None:
            on_step(step, step_loss / max(1, n_tokens))
    model.eval()
    return finished(len(groups), loss_total, tokens_total, start, lr_sum, flops, meter, fed)


def target_count(group: Sequence[dict[str, torch.Tensor]]) -> int:
    """Target positions of a step's micro-batches: the denominator of its position-mean loss (preference pairs,
    ``data.tokenize.collate_pairs``: the pairs, for a loss that is a mean over pairs)."""
    return sum(int(b["chosen"].sum()) if "chosen" in b else int((b["labels"][:, 1:] != IGNORE).sum()) for b in group)


def optimizer_step(
    opt: torch.optim.Optimizer,
    params: Sequence[torch.Tensor],
    lr: float,
    corrections: Sequence[Correction] = (),
    max_grad_norm: float | None = None,
    grad_sq_norm: float | None = None,
) -> None:
    """The end of every training step whose loss is back-propagated (local, joint, DP-SGD and split training):
    corrections, clipping, the optimizer's step at learning rate ``lr``, gradients cleared.

    Clipping scales the gradients by ``max_grad_norm / (‖g‖ + 1e-6)`` when that is below 1, as
    ``clip_grad_norm_`` does; ``grad_sq_norm``: ‖g‖² when the gradient is spread over several holders
    (split learning: both parts' squares summed), else this step's own is taken."""
    for g in opt.param_groups:
        g["lr"] = lr
    for corr in corrections:
        extra = corr.extra_loss(params)
        if extra is not None:
            extra.backward()
        corr.adjust_grads(params)
    if max_grad_norm is not None:
        if grad_sq_norm is None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        else:
            coef = max_grad_norm / (math.sqrt(grad_sq_norm) + 1e-6)
            if coef < 1.0:
                for t in params:
                    if t.grad is not None:
                        t.grad.mul_(coef)
    opt.step()
    opt.zero_grad(set_to_none=True)
    for corr in corrections:
        corr.after_step(params, lr)


def finished(
    steps: int, loss: float, count: int, start: float, lr_sum: float, flops: float, meter, fed: int
) -> LocalResult:
    """The result of a round that ran to its end: ``loss`` summed over ``count`` positions (or examples),
    ``fed`` input tokens."""
    return LocalResult(
        steps,
        loss / max(1, count),
        count,
        time.perf_counter() - start,
        lr_sum=lr_sum,
        flops=flops,
        peak_activation_bytes=meter.peak,
        input_tokens=fed,
    )


def _with_dp_sgd(model, params, batches, lr_at, weight_decay, on_step, optimizer, loss, cost, dp: DpSgdStep):
    """The DP-SGD loop: one Poisson batch a step (possibly empty: the step is then the noise alone)."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    start = time.perf_counter()
    model.train()
    wrapped = GradSampleModule(model, loss_reduction="sum", strict=False)  # hooks on the trainable modules
    opt = DPOptimizer(
        make_optimizer(optimizer, params, lr_at(0), weight_decay),
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        expected_batch_size=dp.expected_batch_size,
        loss_reduction="mean",  # (for the optimizer: divide the noised sum by the expected batch size)
        generator=dp.generator,
    )
    loss_total, examples_total, lr_sum, flops, fed = 0.0, 0, 0.0, 0.0, 0
    meter = ActivationMeter(model.parameters())
    try:
        for step, batch in enumerate(batches):
            lr = lr_at(step)
            if batch["input_ids"].shape[0] == 0:  # nobody sampled: zero per-example gradients, noise only
                for p in params:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
                value, count = 0.0, 0
            else:
                with meter.measure():
                    loss_sum, count = loss(model, batch)
                flops += cost.training(batch) if cost is not None else 0.0
                fed += input_tokens(batch)
                if not torch.isfinite(loss_sum):
                    error = f"non-finite loss ({loss_sum.item()}) at local step {step}"
                    return LocalResult(step, math.nan, examples_total, time.perf_counter() - start, True, error)
                with warnings.catch_warnings():  # Opacus's hooks on the first adapter layer, whose input needs no grad
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    loss_sum.backward()
                value = loss_sum.item()
            optimizer_step(opt, params, lr)
            loss_total += value
            examples_total += count
            lr_sum += lr
            if on_step is not None:
                on_step(step, value / max(1, count))
    finally:
        wrapped._close()  # the model is shared: no hooks or per-sample gradients left behind
        model.eval()
    return finished(len(batches), loss_total, examples_total, start, lr_sum, flops, meter, fed)
