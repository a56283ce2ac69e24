"""Aggregators are pure (init, aggregate) pairs with explicit NamedTuple state, as in optax.

``init(params) -> state``; ``aggregate(params, contributions, state) -> (new_params, state)``.
Nothing is hidden on ``self``: the state is what checkpoints save, and what tests compare.
Call them directly on plain dicts of tensors, no federation needed:

    from fedtune.aggregation import Contribution, build_aggregator
    agg = build_aggregator(name="fedadam")
    state = agg.init(global_params)
    new_params, state = agg.aggregate(global_params, [Contribution(0, delta0, 10.0), ...], state)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

from fedtune.core.types import Params


class Contribution(NamedTuple):
    """One client's update for a round: delta = local params - global params."""

    client_id: int
    delta: Params
    weight: float
    extras: dict[str, Params] = {}  # algorithm name -> its tensors, e.g. {"scaffold": Δc_i}  # noqa: RUF012


class Aggregator(Protocol):
    name: str

    def init(self, params: Params) -> NamedTuple: ...

    def aggregate(
        self, params: Params, contributions: Sequence[Contribution], state: NamedTuple
    ) -> tuple[Params, NamedTuple]: ...

    def broadcast(self, state: NamedTuple) -> dict[str, Params]:
        """Tensors every client receives with the params, by algorithm ({"scaffold": c}); usually empty."""
        ...

    def metrics(self, state: NamedTuple) -> dict[str, float]:
        """Per-round diagnostics kept in the state (e.g. LoRA aggregation error), for metrics.jsonl."""
        ...

    def client_view(self, params: Params, state: NamedTuple, client_id: int) -> Params:
        """What this client receives (the global params, or e.g. a lower-rank view of them)."""
        ...
