"""Zeroth-order training: directional derivatives from two forward passes along seeded directions.

MeZO (Malladi et al., NeurIPS 2023) estimates the gradient along a random direction z ~ N(0, I) from
two losses, g = (L(w + εz) - L(w - εz)) / 2ε, and steps w <- w - η g z. The direction is never stored:
it is regenerated from its seed, tensor by tensor and chunk by chunk, each time it is needed (to
perturb, to undo and to step, fused into the undo: w + (ε - η g) z), so training holds no more than
inference does, besides one chunk of z. A step is recorded as (seed, g, η): anyone holding the same
weights rebuilds the same update from those three numbers (FedKSeed, ``paradigms/fedkseed``).

The direction of a seed is a pure function of the seed and the tensors' shapes in order: tensor t's
values come from a CPU generator seeded with (seed, t), drawn in float32 chunks of ``CHUNK`` elements,
so every party that holds tensors of the same shapes draws the same z whatever their dtype or device.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from fedtune.client.cost import input_tokens
from fedtune.client.local_training import LocalResult, target_count
from fedtune.core import rng
from fedtune.losses import LossFn, token_loss_sum

CHUNK = 1 << 20  # elements of z drawn at once: 4 MiB in float32, whatever the tensor's size


def direction_chunks(p: torch.Tensor, seed: int, index: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(slice of p flattened, its z) for each chunk of tensor ``index`` under ``seed``."""
    g = rng.torch_generator(rng.ZO_DIRECTION, seed, index=index)
    flat = p.view(-1)
    for s in range(0, flat.numel(), CHUNK):
        part = flat[s : s + CHUNK]
        z = torch.randn(part.numel(), generator=g, dtype=torch.float32)  # (c,)
        yield part, z.to(device=p.device, dtype=p.dtype)


def direction_bytes(params: Sequence[torch.Tensor]) -> int:
    """The most bytes of z held at once while moving ``params``: one chunk in float32 (and its cast)."""
    most = 0
    for p in params:
        n = min(p.numel(), CHUNK)
        most = max(most, 4 * n + (0 if p.dtype == torch.float32 else n * p.element_size()))
    return most


def direction(params: Sequence[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """The whole direction z of ``seed``, one tensor per parameter (for tests and small adapters)."""
    out = [p.detach().new_zeros(p.shape) for p in params]
    move_(out, seed, 1.0)
    return out


@torch.no_grad()
def move_(params: Sequence[torch.Tensor], seed: int | Sequence[int], scale: float) -> None:
    """w <- w + scale · z(seed), in place, one chunk of z at a time; ``seed``: one for every tensor, or
    tensor t's own (a direction put together tensor by tensor)."""
    if scale == 0.0:
        return
    seeds = [seed] * len(params) if isinstance(seed, int) else seed
    for t, p in enumerate(params):
        for part, z in direction_chunks(p.data, seeds[t], t):
            part.add_(z, alpha=scale)


@dataclass(frozen=True)
class ZoStep:
    """One zeroth-order step: the direction's seed, the projected gradient g and the learning rate η;
    the update it made is -η·g·z(seed). ``skipped``: |g| was above the clip, no update made."""

    seed: int
    projected: float
    lr: float
    skipped: bool = False


@dataclass(frozen=True)
class ZoResult:
    result: LocalResult
    steps: list[ZoStep] = field(default_factory=list)


@torch.no_grad()
def projected_gradient(
    loss_at: Callable[[], float], params: Sequence[torch.Tensor], seed: int | Sequence[int], eps: float
) -> tuple[float, float, float]:
    """(g, L(w + εz), L(w - εz)) with g = (L(w + εz) - L(w - εz)) / 2ε; the weights are left at w - εz
    (``step_from_minus`` finishes the step)."""
    move_(params, seed, eps)
    plus = loss_at()
    move_(params, seed, -2 * eps)
    minus = loss_at()
    return (plus - minus) / (2 * eps), plus, minus


def mean_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], loss: LossFn | None = None) -> tuple[float, int]:
    """(mean of ``loss`` over ``batch``'s positions, their count), no graph kept; next-token cross-entropy
    by default."""
    with torch.no_grad():
        total, n = (loss or token_loss_sum)(model, batch)
    return float(total) / max(1, int(n)), int(n)


def train_zeroth_order(
    model: torch.nn.Module,
    params: Sequence[torch.Tensor],
    batches: Sequence[dict[str, torch.Tensor]],
    lr_at: Callable[[int], float],
    eps: float,
    clip: float | None,
    seed_of: Callable[[int], int],
    on_step: Callable[[int, float], None] | None = None,
    loss: LossFn | None = None,
) -> ZoResult:
    """One ZO-SGD step per batch: the direction of ``seed_of(step)``, g from two losses on the batch,
    w <- w - η g z, a step whose |g| exceeds ``clip`` skipped (the weights put back). The round's loss is
    the token-weighted mean of (L(w + εz) + L(w - εz)) / 2 over its steps. ``loss(model, batch) -> (sum,
    count)``: next-token cross-entropy by default."""
    start = time.perf_counter()
    model.eval()  # no dropout: the two losses must differ by the direction alone
    log: list[ZoStep] = []
    loss_total, tokens_total, lr_sum, fed = 0.0, 0, 0.0, 0
    for step, batch in enumerate(batches):
        lr, seed = lr_at(step), seed_of(step)
        n = target_count([batch])
        g, plus, minus = projected_gradient(lambda b=batch: mean_loss(model, b, loss)[0], params, seed, eps)
        if not (math.isfinite(plus) and math.isfinite(minus)):
            move_(params, seed, eps)
            error = f"non-finite loss ({plus}, {minus}) at local step {step}"
            return ZoResult(LocalResult(step, math.nan, tokens_total, time.perf_counter() - start, True, error), log)
        skipped = clip is not None and abs(g) > clip
        move_(params, seed, eps if skipped else eps - lr * g)  # back to w, then the step: w - η g z
        log.append(ZoStep(seed, g, lr, skipped))
        loss_total += (plus + minus) / 2 * n
        tokens_total += n
        lr_sum += 0.0 if skipped else lr
        fed += 2 * input_tokens(batch)
        if on_step is not None:
            on_step(step, (plus + minus) / 2)
    result = LocalResult(
        len(log),
        loss_total / max(1, tokens_total),
        tokens_total,
        time.perf_counter() - start,
        lr_sum=lr_sum,
        input_tokens=fed,
    )
    return ZoResult(result, log)


def replay_(params: Sequence[torch.Tensor], steps: Sequence[tuple[int, float]]) -> None:
    """Apply updates given as (seed, amount): w <- w - amount · z(seed), in the order given."""
    for seed, amount in steps:
        move_(params, seed, -amount)
