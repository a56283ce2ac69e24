"""LoRA-aware aggregation (docs/algorithms/lora.md).

  exact  new s·B A = best rank-r approximation of the exact weighted mean Σ_k p_k s B_k A_k
         (products aggregated, then refactorised by truncated SVD, FlexLoRA-style, Bai et al. 2024);
         the relative truncation error is reported every round.
  naive  A and B averaged separately by the inner aggregator (FedIT / OpenFedLLM); the relative error
         ‖Σ p_k s B_k A_k − s (Σ p_k B_k)(Σ p_k A_k)‖ / ‖Σ p_k s B_k A_k‖ is reported every round.
  ffa    A frozen at its seeded initialisation (FFA-LoRA, Sun et al. 2024): only B travels and averaging
         is exact; no aggregator change is needed, the adapter simply has no trainable A.

Heterogeneous client ranks (client k trains rank r_k <= R, the global rank):
  exact      FlexLoRA redistribution: the exact Σ_k p_k s_k B_k A_k is refactorised to rank R by SVD,
             and client k receives its first r_k components (the best rank-r_k approximation).
  zero_pad   HetLoRA: client k receives the first r_k components; its factors come back zero-padded
             to rank R and are averaged (inexact, error reported).

The scaling s_k = alpha / r_k is taken from `alpha` and each A's rank, identically to peft on the
clients; a client's view carries the s_R / s_k factor in B so that its product is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from fedtune.adapters.lora_math import (
    factor_averaging_error,
    lora_pairs,
    pad_to_rank,
    rank_view,
    refactor,
    relative,
    stacked_factors,
    svd_of_product,
)
from fedtune.aggregation.base import Aggregator, Contribution
from fedtune.aggregation.clipping import clip_contributions
from fedtune.aggregation.combine import weighted_mean
from fedtune.aggregation.flat import packed_like
from fedtune.core.types import Params


def _averaging_error(local: Sequence[Params], weights: Sequence[float], alpha: float) -> tuple[float, float]:
    """(relative, absolute) error of averaging each module's A and B apart instead of their products,
    over all modules jointly; `local` holds each client's adapter, all of one rank."""
    err, total = 0.0, 0.0
    for pair in lora_pairs(list(local[0])):
        e, t = factor_averaging_error(
            [f[pair.b_key] for f in local],
            [f[pair.a_key] for f in local],
            weights,
            alpha / local[0][pair.a_key].shape[0],
        )
        err, total = err + e, total + t
    return relative(err, total), math.sqrt(err)


def _normalised_weights(contributions: Sequence[Contribution]) -> list[float]:
    total = float(sum(c.weight for c in contributions))
    if not total > 0:
        raise ValueError(f"aggregation weights must sum to a positive number, got {total}")
    return [c.weight / total for c in contributions]


class LoraExactState(NamedTuple):
    rounds: int = 0
    truncation_error: float = 0.0  # relative Frobenius error of the rank-r refactorisation, last round
    truncation_error_abs: float = 0.0  # the same, absolute: ‖ΔW* − s B'A'‖_F over all modules jointly


class _LoraAggregator:
    """What the FedAvg-over-products aggregators share: per-client rank views, clipping, weights.

    A client below the global rank receives a view of the global adapter at its own rank
    (identity when all ranks agree) and its delta is relative to that view.
    """

    def __init__(self, alpha: float, clip_norm: float | None = None, client_ranks: dict[int, int] | None = None):
        self.alpha, self.clip_norm, self.client_ranks = alpha, clip_norm, client_ranks or {}

    def init(self, params: Params) -> NamedTuple:
        lora_pairs(list(params))  # fail early on a malformed adapter
        return self.state_type()

    def broadcast(self, state: NamedTuple) -> dict[str, Params]:
        return {}

    def client_view(self, params: Params, state: NamedTuple, client_id: int) -> Params:
        rank = self.client_ranks.get(client_id)
        if rank is None:
            return params
        global_rank = params[lora_pairs(list(params))[0].a_key].shape[0]
        return rank_view(params, rank, global_rank)

    def _prepare(
        self, params: Params, contributions: Sequence[Contribution], state: NamedTuple
    ) -> tuple[list[Contribution], list[float], list[Params]]:
        """(contributions in client-id order, normalised weights, each client's final adapter = view + delta)."""
        if not contributions:
            raise ValueError("cannot aggregate zero contributions")
        if self.clip_norm is not None:
            contributions = clip_contributions(contributions, self.clip_norm)
        ordered = sorted(contributions, key=lambda c: c.client_id)
        local = []
        for c in ordered:
            view = self.client_view(params, state, c.client_id)
            local.append({k: view[k] + c.delta[k] for k in view})
        return ordered, _normalised_weights(ordered), local


class LoraExact(_LoraAggregator):
    """Exact FedAvg of LoRA products, refactorised to rank R by truncated SVD (FlexLoRA for mixed ranks).

    ``align=True`` rotates each new factor pair to the previous global one (same product): used
    with downlink updates, where clients receive the change of the factors.
    """

    name = "fedavg+lora_exact"
    state_type = LoraExactState

    def __init__(
        self,
        alpha: float,
        clip_norm: float | None = None,
        client_ranks: dict[int, int] | None = None,
        align: bool = False,
    ):
        super().__init__(alpha, clip_norm, client_ranks)
        self.align = align

    def metrics(self, state: LoraExactState) -> dict[str, float]:
        return {
            "lora_truncation_error": state.truncation_error,
            "lora_truncation_error_abs": state.truncation_error_abs,
        }

    def aggregate(
        self, params: Params, contributions: Sequence[Contribution], state: LoraExactState
    ) -> tuple[Params, LoraExactState]:
        ordered, weights, local = self._prepare(params, contributions, state)
        pairs = lora_pairs(list(params))
        lora_keys = {k for p in pairs for k in (p.a_key, p.b_key)}
        out = packed_like(params, params)  # one buffer: the round loop's finite check is then one kernel
        for k, v in _mean_of_others(ordered, lora_keys).items():
            torch.add(params[k], v, out=out[k])
        tail, total = 0.0, 0.0
        for pair in pairs:
            a_k, b_k = [f[pair.a_key] for f in local], [f[pair.b_key] for f in local]
            coeffs = [w * self.alpha / a.shape[0] for w, a in zip(weights, a_k, strict=True)]  # p_k s_k
            u, s, vh = svd_of_product(*stacked_factors(b_k, a_k, coeffs))  # of Σ p_k s_k B_k A_k
            rank = params[pair.a_key].shape[0]
            near = (params[pair.a_key], params[pair.b_key]) if self.align else None
            _, _, lost = refactor(
                u, s, vh, rank, self.alpha / rank, params[pair.a_key].dtype, near, (out[pair.a_key], out[pair.b_key])
            )
            tail, total = tail + lost, total + float(s.pow(2).sum())
        return out, LoraExactState(state.rounds + 1, relative(tail, total), math.sqrt(tail))


def _mean_of_others(ordered: Sequence[Contribution], lora_keys: set[str]) -> Params:
    """Weighted mean delta of the tensors that are not LoRA factors (shared shapes across clients)."""
    return weighted_mean([c._replace(delta={k: v for k, v in c.delta.items() if k not in lora_keys}) for c in ordered])


class LoraZeroPadState(NamedTuple):
    rounds: int = 0
    factor_averaging_error: float = 0.0  # relative error of averaging zero-padded factors, last round
    factor_averaging_error_abs: float = 0.0


class LoraZeroPad(_LoraAggregator):
    """HetLoRA (Cho et al. 2024): mixed-rank factors zero-padded to rank R and averaged; error reported."""

    name = "fedavg+lora_zero_pad"
    state_type = LoraZeroPadState

    def __init__(self, alpha: float, client_ranks: dict[int, int], clip_norm: float | None = None):
        super().__init__(alpha, clip_norm, client_ranks)

    def metrics(self, state: LoraZeroPadState) -> dict[str, float]:
        return {
            "lora_factor_averaging_error": state.factor_averaging_error,
            "lora_factor_averaging_error_abs": state.factor_averaging_error_abs,
        }

    def aggregate(
        self, params: Params, contributions: Sequence[Contribution], state: LoraZeroPadState
    ) -> tuple[Params, LoraZeroPadState]:
        ordered, weights, local = self._prepare(params, contributions, state)
        global_rank = params[lora_pairs(list(params))[0].a_key].shape[0]
        padded = [pad_to_rank(f, global_rank) for f in local]
        new = weighted_mean(
            [
                Contribution(c.client_id, {k: f[k] - params[k] for k in params}, c.weight)
                for c, f in zip(ordered, padded, strict=True)
            ]
        )
        new = {k: params[k] + v for k, v in new.items()}
        return new, LoraZeroPadState(state.rounds + 1, *_averaging_error(padded, weights, self.alpha))


class LoraReportState(NamedTuple):
    inner: NamedTuple
    factor_averaging_error: float = 0.0  # relative error of averaging A and B separately, last round
    factor_averaging_error_abs: float = 0.0  # ‖Σ p_k s B_k A_k − s B̄ Ā‖_F over all modules jointly


class LoraNaive:
    """Any aggregator applied to A and B separately, with the inexactness measured and reported."""

    def __init__(self, inner: Aggregator, alpha: float):
        self.inner, self.alpha = inner, alpha
        self.name = f"{inner.name}+lora_naive"

    def init(self, params: Params) -> LoraReportState:
        lora_pairs(list(params))
        return LoraReportState(self.inner.init(params))

    def broadcast(self, state: LoraReportState) -> dict[str, Params]:
        return self.inner.broadcast(state.inner)

    def client_view(self, params: Params, state: LoraReportState, client_id: int) -> Params:
        return self.inner.client_view(params, state.inner, client_id)

    def metrics(self, state: LoraReportState) -> dict[str, float]:
        return {
            **self.inner.metrics(state.inner),
            "lora_factor_averaging_error": state.factor_averaging_error,
            "lora_factor_averaging_error_abs": state.factor_averaging_error_abs,
        }

    def aggregate(
        self, params: Params, contributions: Sequence[Contribution], state: LoraReportState
    ) -> tuple[Params, LoraReportState]:
        new, inner = self.inner.aggregate(params, contributions, state.inner)
        ordered = sorted(contributions, key=lambda c: c.client_id)
        local = [{k: params[k] + c.delta[k] for k in params} for c in ordered]
        return new, LoraReportState(inner, *_averaging_error(local, _normalised_weights(ordered), self.alpha))
