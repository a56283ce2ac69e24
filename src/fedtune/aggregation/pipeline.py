"""An aggregator assembled from parts: clip -> combine -> server optimizer.

FedAvg is (mean, sgd η=1); FedAvgM is (mean, momentum); FedAdam/FedYogi/FedAdagrad are (mean,
adaptive); robust variants swap the combiner (median, trimmed mean, Krum). The whole state is
one NamedTuple: the optimizer's moments plus a round counter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from fedtune.aggregation.base import Contribution
from fedtune.aggregation.clipping import clip_contributions
from fedtune.aggregation.combine import Combiner
from fedtune.aggregation.server_opt import ServerOptimizer
from fedtune.types import Params


class PipelineState(NamedTuple):
    optimizer: NamedTuple
    rounds: int = 0


class Pipeline:
    def __init__(self, name: str, combine: Combiner, optimizer: ServerOptimizer, clip_norm: float | None = None):
        self.name, self.combine, self.optimizer, self.clip_norm = name, combine, optimizer, clip_norm

    def init(self, params: Params) -> PipelineState:
        return PipelineState(self.optimizer.init(params))

    def broadcast(self, state: PipelineState) -> dict[str, Params]:
        return {}

    def metrics(self, state: PipelineState) -> dict[str, float]:
        return {}

    def client_view(self, params: Params, state: PipelineState, client_id: int) -> Params:
        return params

    def aggregate(
        self, params: Params, contributions: Sequence[Contribution], state: PipelineState
    ) -> tuple[Params, PipelineState]:
        if self.clip_norm is not None:
            contributions = clip_contributions(contributions, self.clip_norm)
        pseudo_grad = self.combine(contributions)
        new, opt_state = self.optimizer.update(params, pseudo_grad, state.optimizer)
        return new, PipelineState(opt_state, state.rounds + 1)
