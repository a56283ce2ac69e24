"""An aggregator assembled from stages: clip -> combine -> server optimizer.

FedAvg is (mean, sgd η=1); FedAvgM is (mean, momentum); FedAdam/FedYogi/FedAdagrad are (mean,
adaptive); robust variants swap the combiner (median, trimmed mean, Krum); DP-FedAvg swaps in the
clipped, noised, fixed-denominator mean (``privacy.dp.GaussianMean``), a combine stage with a state of
its own. The whole state is one NamedTuple: the optimizer's, a round counter, and the combine stage's.

A combine stage also takes the round's updates as one sum (``of_sum``), which is all secure aggregation
gives the server: the sum enters the chain after clipping and combining, and goes on through the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

from fedtune.aggregation.base import Contribution
from fedtune.aggregation.clipping import clip_contributions
from fedtune.aggregation.combine import Combiner
from fedtune.aggregation.server_opt import ServerOptimizer
from fedtune.core.types import Params


class PipelineState(NamedTuple):
    optimizer: NamedTuple
    rounds: int = 0
    combine: Any = None  # a combine stage's own state (DP-FedAvg's clipping norm and noise), else None


class CombineStage(Protocol):
    """Many client updates -> one pseudo-gradient, with a state of the stage's own (None when it keeps none)."""

    def init(self) -> Any: ...

    def combine(self, params: Params, contributions: Sequence[Contribution], state: Any) -> tuple[Params, Any]: ...

    def of_sum(self, params: Params, total: Params, count: int, state: Any, noised: bool) -> tuple[Params, Any]:
        """The pseudo-gradient from the sum of ``count`` updates already clipped as the stage would
        (secure aggregation); ``noised``: the clients added the stage's noise in shares."""
        ...

    def metrics(self, state: Any) -> dict[str, float]:
        """What the stage may publish about the last round it combined."""
        ...


class Stateless:
    """A combiner function (``aggregation.combine``) as a stage: no state; a sum's combination is its mean."""

    def __init__(self, combine: Combiner):
        self.fn = combine

    def init(self) -> None:
        return None

    def combine(self, params: Params, contributions: Sequence[Contribution], state: None) -> tuple[Params, None]:
        return self.fn(contributions), None

    def of_sum(self, params: Params, total: Params, count: int, state: None, noised: bool) -> tuple[Params, None]:
        return self.fn([Contribution(-1, {k: v / count for k, v in total.items()}, 1.0)]), None  # the mean, combined

    def metrics(self, state: None) -> dict[str, float]:
        return {}


class Pipeline:
    def __init__(
        self, name: str, combine: Combiner | CombineStage, optimizer: ServerOptimizer, clip_norm: float | None = None
    ):
        self.name, self.combine, self.optimizer, self.clip_norm = name, combine, optimizer, clip_norm
        self.stage: CombineStage = combine if hasattr(combine, "of_sum") else Stateless(combine)  # type: ignore[arg-type]

    def init(self, params: Params) -> PipelineState:
        return PipelineState(self.optimizer.init(params), 0, self.stage.init())

    def broadcast(self, state: PipelineState) -> dict[str, Params]:
        return {}

    def metrics(self, state: PipelineState) -> dict[str, float]:
        return self.stage.metrics(state.combine)

    def client_view(self, params: Params, state: PipelineState, client_id: int) -> Params:
        return params

    def aggregate(
        self, params: Params, contributions: Sequence[Contribution], state: PipelineState
    ) -> tuple[Params, PipelineState]:
        if self.clip_norm is not None:
            contributions = clip_contributions(contributions, self.clip_norm)
        pseudo_grad, combined = self.stage.combine(params, contributions, state.combine)
        new, opt_state = self.optimizer.update(params, pseudo_grad, state.optimizer)
        return new, PipelineState(opt_state, state.rounds + 1, combined)

    def aggregate_sum(
        self, params: Params, total: Params, count: int, state: PipelineState, noised: bool = False
    ) -> tuple[Params, PipelineState]:
        """``aggregate`` for the sum of ``count`` clipped updates (secure aggregation). A stage without state
        and nothing summed leaves the params and the state as they are."""
        if count == 0 and state.combine is None:
            return params, state
        pseudo_grad, combined = self.stage.of_sum(params, total, count, state.combine, noised)
        new, opt_state = self.optimizer.update(params, pseudo_grad, state.optimizer)
        return new, PipelineState(opt_state, state.rounds + 1, combined)
