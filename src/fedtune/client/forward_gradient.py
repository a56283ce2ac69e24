"""Forward-gradient training (FwdLLM, Xu et al., USENIX ATC 2024): gradients from perturbed inference alone.

A step estimates the gradient on its batch from k perturbations, ĝ = (1/k) Σ_i d_i z_i, each d_i the
directional derivative along z_i from two forward passes (``zeroth_order.projected_gradient``), and takes
one SGD step w <- w - η ĝ. Two of FwdLLM's devices decide the z_i and k:

- **variance-paced count**: perturbations are added two at a time until the split-half variance of the
  estimate, mean over values of Var(ĝ_even, ĝ_odd) = mean((ĝ_even - ĝ_odd)²) / 2 (FwdLLM's check, on the
  mean of the even and of the odd perturbations' estimates), is at most ``variance``, or ``most`` are used;
- **aligned perturbations**: each tensor's z is the one, of ``candidates`` seeded draws, whose cosine with
  a reference direction is largest in size (the estimate d·z is the same for -z, so a candidate's sign
  does not matter and |cos| doubles the choice). FwdLLM's reference is the previous round's global
  gradient; here it is the global adapter's movement since the client last trained (parameter sharing
  keeps the adapter it started from in the client's state), fixed through the round: a reference built
  from the round's own estimates would align later directions with their noise and make them worse
  (tests/client/test_forward_gradient.py). A client's first round draws plain Gaussian directions.

MeZO (``zeroth_order.train_zeroth_order``) is the case k = 1, one candidate. A perturbation whose |d_i|
is above ``clip`` is left out of the estimate, and a step is capped at η · clip · (√n + 10), the bound
``schedule.UpdateBound`` assumes of a zeroth-order step. Held besides the model: the two half sums and the
reference, each the size of the trainable values in float32, and one chunk of z.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedtune.client.cost import input_tokens
from fedtune.client.local_training import LocalResult, target_count
from fedtune.client.zeroth_order import direction_bytes, direction_chunks, mean_loss, move_, projected_gradient
from fedtune.losses import LossFn

_CANDIDATE = 0x4657  # keys a perturbation's candidate seeds apart from a step's own seed


def candidate_seed(seed: int, perturbation: int, candidate: int) -> int:
    """The direction seed of candidate ``candidate`` of perturbation ``perturbation`` in the step of ``seed``."""
    return int(np.random.default_rng([seed, perturbation, candidate, _CANDIDATE]).integers(2**63 - 1))


def held_bytes(params: Sequence[torch.Tensor]) -> int:
    """What forward-gradient training holds besides the model: two half sums and the reference (float32),
    and one chunk of z."""
    return 3 * 4 * sum(p.numel() for p in params) + direction_bytes(params)


@dataclass(frozen=True)
class FwdStep:
    """One step: the perturbations it used (k), those left out for |d| above the clip, and the split-half
    variance at its end (nan with fewer than two perturbations)."""

    perturbations: int
    clipped: int
    variance: float


@torch.no_grad()
def _aligned_seeds(
    params: Sequence[torch.Tensor], reference: Sequence[torch.Tensor] | None, seed: int, i: int, candidates: int
) -> list[int]:
    """Per tensor, the seed of the candidate direction with the largest |cosine| to ``reference`` (the first
    one when there is no reference or one candidate)."""
    if reference is None or candidates <= 1:
        return [candidate_seed(seed, i, 0)] * len(params)
    chosen = []
    for t, (p, r) in enumerate(zip(params, reference, strict=True)):
        flat_r = r.view(-1)
        r_norm = float(flat_r.norm())
        if r_norm == 0.0:  # no movement to align with
            chosen.append(candidate_seed(seed, i, 0))
            continue
        best, best_cos = candidate_seed(seed, i, 0), -math.inf
        for j in range(candidates):
            s = candidate_seed(seed, i, j)
            dot, sq, at = 0.0, 0.0, 0
            for part, z in direction_chunks(p.data, s, t):
                zf = z.float()
                dot += float(zf @ flat_r[at : at + part.numel()])
                sq += float(zf @ zf)
                at += part.numel()
            cos = abs(dot) / max(math.sqrt(sq) * r_norm, 1e-30)
            if cos > best_cos:
                best, best_cos = s, cos
        chosen.append(best)
    return chosen


@torch.no_grad()
def _accumulate(into: Sequence[torch.Tensor], params: Sequence[torch.Tensor], seeds: Sequence[int], d: float) -> None:
    """into += d · z(seeds), tensor by tensor."""
    for t, (acc, p) in enumerate(zip(into, params, strict=True)):
        flat, at = acc.view(-1), 0
        for part, z in direction_chunks(p.data, seeds[t], t):
            flat[at : at + part.numel()].add_(z.float(), alpha=d)
            at += part.numel()


def _split_variance(even: Sequence[torch.Tensor], odd: Sequence[torch.Tensor], halves: int) -> float:
    """mean over values of Var(ĝ_even, ĝ_odd) with each half's mean estimate = its sum / ``halves``."""
    sq = sum(float(((e - o) / halves).pow(2).sum()) for e, o in zip(even, odd, strict=True))
    return sq / 2 / max(1, sum(e.numel() for e in even))


def train_forward_gradient(
    model: torch.nn.Module,
    params: Sequence[torch.Tensor],
    batches: Sequence[dict[str, torch.Tensor]],
    lr_at: Callable[[int], float],
    eps: float,
    clip: float | None,
    seed_of: Callable[[int], int],
    most: int,
    variance: float | None,
    candidates: int,
    reference: Sequence[torch.Tensor] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    loss: LossFn | None = None,
) -> tuple[LocalResult, list[FwdStep]]:
    """One SGD step per batch on the forward gradient of up to ``most`` perturbations (paced by
    ``variance``; None: always ``most``), each tensor's direction the one of ``candidates`` best aligned
    with ``reference`` (one tensor per parameter; None: plain directions). The round's loss is the
    token-weighted mean of the perturbed losses' midpoints over its perturbations."""
    start = time.perf_counter()
    model.eval()  # no dropout: the two losses must differ by the direction alone
    n_values = sum(p.numel() for p in params)
    cap = None if clip is None else clip * (math.sqrt(n_values) + 10)
    if reference is not None:  # float32, where each parameter is
        reference = [r.detach().to(p.device, torch.float32) for r, p in zip(reference, params, strict=True)]
    log: list[FwdStep] = []
    loss_total, loss_tokens, tokens_total, lr_sum, fed = 0.0, 0, 0, 0.0, 0
    for step, batch in enumerate(batches):
        lr, seed = lr_at(step), seed_of(step)
        n = target_count([batch])
        halves = [[torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params] for _ in range(2)]
        counts, clipped, var = [0, 0], 0, math.nan
        for i in range(most):
            seeds = _aligned_seeds(params, reference, seed, i, candidates)
            d, plus, minus = projected_gradient(lambda b=batch: mean_loss(model, b, loss)[0], params, seeds, eps)
            move_(params, seeds, eps)  # back to w
            fed += 2 * input_tokens(batch)
            if not (math.isfinite(plus) and math.isfinite(minus)):
                error = f"non-finite loss ({plus}, {minus}) at local step {step}"
                elapsed = time.perf_counter() - start
                return LocalResult(step, math.nan, tokens_total, elapsed, True, error, input_tokens=fed), log
            loss_total += (plus + minus) / 2 * n
            loss_tokens += n
            if clip is not None and abs(d) > clip:
                clipped += 1
            else:
                _accumulate(halves[i % 2], params, seeds, d)
                counts[i % 2] += 1
            if i % 2 == 1 and min(counts) > 0:
                # the split-half check needs equal halves: FwdLLM's two means of equally many estimates
                var = _split_variance(halves[0], halves[1], min(counts)) if counts[0] == counts[1] else var
                if variance is not None and counts[0] == counts[1] and var <= variance:
                    break
        k = counts[0] + counts[1]
        if on_step is not None:
            on_step(step, loss_total / max(1, loss_tokens))
        log.append(FwdStep(k, clipped, var))
        tokens_total += n
        if k == 0:
            continue
        estimate = [(e + o) / k for e, o in zip(*halves, strict=True)]  # ĝ, float32
        norm = math.sqrt(sum(float(g.pow(2).sum()) for g in estimate))
        scale = lr if cap is None or norm <= cap else lr * cap / norm
        for p, g in zip(params, estimate, strict=True):
            p.data.add_(g.to(p.dtype), alpha=-scale)
        lr_sum += lr
    result = LocalResult(
        len(log),
        loss_total / max(1, loss_tokens),
        tokens_total,
        time.perf_counter() - start,
        lr_sum=lr_sum,
        input_tokens=fed,
    )
    return result, log
