"""Combiners: many client deltas -> one pseudo-gradient. Pure functions of the contributions.

  mean           Σ_k p_k Δ_k / Σ_k p_k                          (FedAvg; weighted)
  median         coordinate-wise median of the Δ_k              (Yin et al. 2018; unweighted)
  trimmed_mean   per coordinate, drop the β·K largest and β·K smallest values, average the rest
                                                                (Yin et al. 2018; unweighted)
  krum           the m deltas with the lowest Krum scores, weighted mean of those
                 (score = Σ of squared distances to its K − f − 2 nearest others; Blanchard et al. 2017;
                 m = 1 is Krum, m > 1 is multi-Krum)

Clients are processed in client-id order, so results never depend on reply order.
Robust combiners order each coordinate's K values in cache-sized blocks: beyond the result they hold one
2 MB block per thread (and a float32 copy of updates sent in another dtype).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import numpy as np
import torch

from fedtune.aggregation.base import Contribution
from fedtune.aggregation.flat import flats, unflatten
from fedtune.core.types import Params

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


_BLOCK_VALUES = 1 << 19  # values in one (coordinates, K) block: 2 MB of float32, stays in cache
RowReduce = Callable[[np.ndarray], np.ndarray]  # (c, K) float32, one row per coordinate -> (c,); may reorder rows


def _per_coordinate(ordered: list[Contribution], key: str, reduce: RowReduce) -> torch.Tensor:
    """``reduce`` of every coordinate's K values, one cache-sized block of coordinates at a time.

    Each block is gathered as (c, K), one contiguous row per coordinate, so ordering a row reads adjacent
    memory (over dim 0 of the (K, D) stack it would stride through all of it), and the blocks are spread
    over torch's thread count (numpy sorts without the GIL). A block's result does not depend on which
    thread ran it.
    """
    first = ordered[0].delta[key]
    flat = [c.delta[key].reshape(-1).to("cpu", torch.float32).numpy() for c in ordered]  # K x (D,)
    n, k = first.numel(), len(ordered)
    step = max(1, _BLOCK_VALUES // k)
    out = np.empty(n, dtype=np.float32)  # (D,)
    starts = range(0, n, step)
    lanes = max(1, min(torch.get_num_threads(), len(starts)))

    def lane(i: int) -> None:
        block = np.empty((min(step, n), k), dtype=np.float32)  # (c, K), this lane's own
        for start in starts[i::lanes]:
            stop = min(n, start + step)
            rows = block[: stop - start]  # (c, K)
            for j, f in enumerate(flat):
                rows[:, j] = f[start:stop]
            out[start:stop] = reduce(rows)

    if lanes == 1:
        lane(0)
    else:
        list(_pool().map(lane, range(lanes)))
    return torch.from_numpy(out).reshape(first.shape).to(first.dtype)


@cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max(1, torch.get_num_threads()), thread_name_prefix="fedtune-combine")


def _median_rows(rows: np.ndarray) -> np.ndarray:
    """(c, K) -> (c,): each row's median; with an even K, the mean of the two middle values."""
    k = rows.shape[1]
    rows.sort(axis=1)  # in place; numpy's SIMD sort of short rows beats its partition (benchmarks/README.md)
    if k % 2:
        return rows[:, k // 2]
    return np.float32(0.5) * (rows[:, k // 2 - 1] + rows[:, k // 2])


def coordinate_median(contributions: Sequence[Contribution]) -> Params:
    """Coordinate-wise median; with an even count, the mean of the two middle values."""
    ordered = _ordered(contributions)
    return {key: _per_coordinate(ordered, key, _median_rows) for key in ordered[0].delta}


def _trimmed_rows(cut: int) -> RowReduce:
    def reduce(rows: np.ndarray) -> np.ndarray:
        """(c, K) -> (c,): each row's mean without its ``cut`` largest and ``cut`` smallest values (the middle
        values themselves are summed, never total − extremes: an outlier of 1e30 would cancel every honest digit)."""
        k = rows.shape[1]
        if cut == 0:
            return rows.mean(axis=1)
        rows.sort(axis=1)  # in place, as for the median
        return rows[:, cut : k - cut].mean(axis=1)  # (c,)

    return reduce


def trimmed_mean(contributions: Sequence[Contribution], beta: float) -> Params:
    """Per coordinate, drop floor(beta * K) values at each end and average the rest."""
    ordered = _ordered(contributions)
    k = len(ordered)
    cut = math.floor(beta * k)
    if k - 2 * cut < 1:
        raise ValueError(f"trim fraction {beta} removes all {k} clients; lower aggregation.trim_fraction")
    reduce = _trimmed_rows(cut)
    return {key: _per_coordinate(ordered, key, reduce) for key in ordered[0].delta}


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
