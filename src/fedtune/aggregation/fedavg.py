"""FedAvg (McMahan et al. 2017): w <- w + sum_k (n_k / n) * delta_k."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from fedtune.aggregation.base import Contribution, weighted_mean
from fedtune.types import Params


class FedAvgState(NamedTuple):
    rounds: int = 0  # aggregations applied so far


class FedAvg:
    name = "fedavg"

    def init(self, params: Params) -> FedAvgState:
        return FedAvgState()

    def aggregate(
        self, params: Params, contributions: Sequence[Contribution], state: FedAvgState
    ) -> tuple[Params, FedAvgState]:
        mean = weighted_mean(contributions)
        return {k: params[k] + mean[k] for k in params}, FedAvgState(state.rounds + 1)
