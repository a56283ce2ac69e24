"""Combiners: many client deltas -> one pseudo-gradient. Pure functions of the contributions.

  mean           Σ_k p_k Δ_k / Σ_k p_k                          (FedAvg; weighted)
  median         coordinate-wise median of the Δ_k              (Yin et al. 2018; unweighted)
  trimmed_mean   per coordinate, drop the β·K largest and β·K smallest values, average the rest
                                                                (Yin et al. 2018; unweighted)
  krum           the m deltas with the lowest Krum scores, weighted mean of those
                 (score = Σ of squared distances to its K − f − 2 nearest others; Blanchard et al. 2017;
                 m = 1 is Krum, m > 1 is multi-Krum)

Clients are processed in client-id order, so results never depend on reply order.
Robust combiners work one tensor at a time: memory is K x the largest tensor, not K x the adapter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from fedtune.aggregation.base import Contribution
from fedtune.aggregation.flat import flats, unflatten
from fedtune.types import Params

Combiner = Callable[[Sequence[Contribution]], Params]


def _ordered(contributions: Sequence[Contribution]) -> list[Contribution]:
    if not contributions:
        raise ValueError("cannot aggregate zero contributions")
    return sorted(contributions, key=lambda c: c.client_id)


def weighted_mean(contributions: Sequence[Contribution]) -> Params:
    """Σ_k w_k Δ_k / Σ_k w_k, accumulated in float32 in client-id order (deterministic)."""
    ordered = _ordered(contributions)
    total = float(sum(c.weight for c in ordered))
    if not total > 0:
        raise ValueError(f"aggregation weights must sum to a positive number, got {total}")
    buffers = flats([c.delta for c in ordered])
    if buffers is not None:  # every delta tiles one buffer in one layout: K kernels, not K per tensor
        acc = torch.zeros(buffers[0].shape, dtype=torch.float32)  # (Σ numel,)
        for c, flat in zip(ordered, buffers, strict=True):
            acc.add_(flat.to(torch.float32), alpha=c.weight / total)
        return unflatten(acc.to(buffers[0].dtype), ordered[0].delta)
    out: Params = {}
    for key, first in ordered[0].delta.items():
        acc = torch.zeros(first.shape, dtype=torch.float32)
        for c in ordered:
            acc.add_(c.delta[key].to(torch.float32), alpha=c.weight / total)
        out[key] = acc.to(first.dtype)
    return out


def _stacked(ordered: list[Contribution], key: str) -> torch.Tensor:
    return torch.stack([c.delta[key].to(torch.float32) for c in ordered])  # (K, *shape)


def coordinate_median(contributions: Sequence[Contribution]) -> Params:
    """Coordinate-wise median; with an even count, the mean of the two middle values."""
    ordered = _ordered(contributions)
    out: Params = {}
    for key, first in ordered[0].delta.items():
        vals = _stacked(ordered, key)  # (K, *shape)
        lower = vals.median(dim=0).values  # selection, not a full sort: the lower median
        mid = lower if len(ordered) % 2 else 0.5 * (lower - (-vals).median(dim=0).values)  # even: mean of the two
        out[key] = mid.to(first.dtype)
    return out


def trimmed_mean(contributions: Sequence[Contribution], beta: float) -> Params:
    """Per coordinate, drop floor(beta * K) values at each end and average the rest."""
    ordered = _ordered(contributions)
    k = len(ordered)
    cut = math.floor(beta * k)
    if k - 2 * cut < 1:
        raise ValueError(f"trim fraction {beta} removes all {k} clients; lower aggregation.trim_fraction")
    out: Params = {}
    for key, first in ordered[0].delta.items():
        sorted_vals = _stacked(ordered, key).sort(dim=0).values  # (K, *shape)
        out[key] = sorted_vals[cut : k - cut].mean(dim=0).to(first.dtype)
    return out


def krum_scores(contributions: Sequence[Contribution], byzantine: int) -> list[float]:
    """Krum score of each contribution (client-id order): Σ of squared distances to its K − f − 2 nearest."""
    ordered = _ordered(contributions)
    k = len(ordered)
    neighbours = k - byzantine - 2
    if neighbours < 1:
        raise ValueError(
            f"Krum needs K > f + 2 clients: K={k}, f={byzantine}; lower aggregation.byzantine or sample more clients"
        )
    dist = torch.zeros(k, k, dtype=torch.float64)  # (K, K) squared distances, summed over tensors
    for key in sorted(ordered[0].delta):  # fixed order: the float sum must not depend on dict order
        flat = _stacked(ordered, key).reshape(k, -1).double()  # (K, D)
        dist += torch.cdist(flat, flat, compute_mode="donot_use_mm_for_euclid_dist").pow(2)
    scores = []
    for i in range(k):
        others = torch.cat([dist[i, :i], dist[i, i + 1 :]])
        scores.append(float(others.sort().values[:neighbours].sum()))
    return scores


def krum(contributions: Sequence[Contribution], byzantine: int, select: int = 1) -> Params:
    """Weighted mean of the `select` contributions with the lowest Krum scores."""
    ordered = _ordered(contributions)
    scores = krum_scores(ordered, byzantine)
    chosen = sorted(range(len(ordered)), key=lambda i: (scores[i], ordered[i].client_id))[: max(1, select)]
    return weighted_mean([ordered[i] for i in sorted(chosen)])
