"""LoRA-aware aggregation (docs/algorithms/lora.md).

  exact  new s·B A = best rank-r approximation of the exact weighted mean Σ_k p_k s B_k A_k
         (products aggregated, then refactorised by truncated SVD, FlexLoRA-style, Bai et al. 2024);
         the relative truncation error is reported every round.
  naive  A and B averaged separately by the inner aggregator (FedIT / OpenFedLLM); the relative error
         ‖Σ p_k s B_k A_k − s (Σ p_k B_k)(Σ p_k A_k)‖ / ‖Σ p_k s B_k A_k‖ is reported every round.
  ffa    A frozen at its seeded initialisation (FFA-LoRA, Sun et al. 2024): only B travels and averaging
         is exact; no aggregator change is needed, the adapter simply has no trainable A.

The scaling s = alpha / r is taken from `alpha` and each A's rank, identically to peft on the clients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from fedtune.adapters.lora_math import (
    factor_averaging_error,
    lora_pairs,
    refactor,
    relative,
    stacked_factors,
    svd_of_product,
)
from fedtune.aggregation.base import Aggregator, Contribution
from fedtune.aggregation.clipping import clip_contributions
from fedtune.aggregation.combine import weighted_mean
from fedtune.types import Params


def _client_factors(params: Params, contributions: Sequence[Contribution], key: str) -> list[torch.Tensor]:
    return [params[key] + c.delta[key] for c in contributions]


def _normalised_weights(contributions: Sequence[Contribution]) -> list[float]:
    total = float(sum(c.weight for c in contributions))
    if not total > 0:
        raise ValueError(f"aggregation weights must sum to a positive number, got {total}")
    return [c.weight / total for c in contributions]


class LoraExactState(NamedTuple):
    rounds: int = 0
    truncation_error: float = 0.0  # relative Frobenius error of the rank-r refactorisation, last round


class LoraExact:
    """Exact FedAvg of LoRA products, refactorised to rank r by truncated SVD."""

    name = "fedavg+lora_exact"

    def __init__(self, alpha: float, clip_norm: float | None = None):
        self.alpha, self.clip_norm = alpha, clip_norm

    def init(self, params: Params) -> LoraExactState:
        lora_pairs(list(params))  # fail early on a malformed adapter
        return LoraExactState()

    def broadcast(self, state: LoraExactState) -> Params:
        return {}

    def metrics(self, state: LoraExactState) -> dict[str, float]:
        return {"lora_truncation_error": state.truncation_error}

    def aggregate(
        self, params: Params, contributions: Sequence[Contribution], state: LoraExactState
    ) -> tuple[Params, LoraExactState]:
        if not contributions:
            raise ValueError("cannot aggregate zero contributions")
        if self.clip_norm is not None:
            contributions = clip_contributions(contributions, self.clip_norm)
        ordered = sorted(contributions, key=lambda c: c.client_id)
        weights = _normalised_weights(ordered)
        pairs = lora_pairs(list(params))
        lora_keys = {k for p in pairs for k in (p.a_key, p.b_key)}
        out = weighted_mean(
            [c._replace(delta={k: v for k, v in c.delta.items() if k not in lora_keys}) for c in ordered]
        )
        out = {k: params[k] + v for k, v in out.items()}
        tail, total = 0.0, 0.0
        for pair in pairs:
            a_k, b_k = _client_factors(params, ordered, pair.a_key), _client_factors(params, ordered, pair.b_key)
            rank = params[pair.a_key].shape[0]
            scale = self.alpha / rank
            b_stack, a_stack = stacked_factors(b_k, a_k, [w * scale for w in weights])  # mean of s B_k A_k
            u, s, vh = svd_of_product(b_stack, a_stack)
            out[pair.a_key], out[pair.b_key], lost = refactor(u, s, vh, rank, scale, params[pair.a_key].dtype)
            tail, total = tail + lost, total + float(s.pow(2).sum())
        return out, LoraExactState(state.rounds + 1, relative(tail, total))


class LoraReportState(NamedTuple):
    inner: NamedTuple
    factor_averaging_error: float = 0.0  # relative error of averaging A and B separately, last round


class LoraNaive:
    """Any aggregator applied to A and B separately, with the inexactness measured and reported."""

    def __init__(self, inner: Aggregator, alpha: float):
        self.inner, self.alpha = inner, alpha
        self.name = f"{inner.name}+lora_naive"

    def init(self, params: Params) -> LoraReportState:
        lora_pairs(list(params))
        return LoraReportState(self.inner.init(params))

    def broadcast(self, state: LoraReportState) -> Params:
        return self.inner.broadcast(state.inner)

    def metrics(self, state: LoraReportState) -> dict[str, float]:
        return {**self.inner.metrics(state.inner), "lora_factor_averaging_error": state.factor_averaging_error}

    def aggregate(
        self, params: Params, contributions: Sequence[Contribution], state: LoraReportState
    ) -> tuple[Params, LoraReportState]:
        new, inner = self.inner.aggregate(params, contributions, state.inner)
        ordered = sorted(contributions, key=lambda c: c.client_id)
        weights = _normalised_weights(ordered)
        err, total = 0.0, 0.0
        for pair in lora_pairs(list(params)):
            a_k, b_k = _client_factors(params, ordered, pair.a_key), _client_factors(params, ordered, pair.b_key)
            e, t = factor_averaging_error(b_k, a_k, weights, self.alpha / params[pair.a_key].shape[0])
            err, total = err + e, total + t
        return new, LoraReportState(inner, relative(err, total))
