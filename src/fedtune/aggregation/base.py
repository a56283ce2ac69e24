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
from typing import Any, NamedTuple, Protocol

import torch

from fedtune.types import Params


class Contribution(NamedTuple):
    """One client's update for a round: delta = local params - global params."""

    client_id: int
    delta: Params
    weight: float
    extras: Params = {}  # algorithm-specific tensors, e.g. SCAFFOLD's control-variate delta  # noqa: RUF012


class Aggregator(Protocol):
    name: str

    def init(self, params: Params) -> NamedTuple: ...

    def aggregate(
        self, params: Params, contributions: Sequence[Contribution], state: NamedTuple
    ) -> tuple[Params, NamedTuple]: ...

    def broadcast(self, state: NamedTuple) -> Params:
        """Tensors every client receives with the params this round (e.g. SCAFFOLD's c); usually empty."""
        ...

    def metrics(self, state: NamedTuple) -> dict[str, float]:
        """Per-round diagnostics kept in the state (e.g. LoRA aggregation error), for metrics.jsonl."""
        ...

    def client_view(self, params: Params, state: NamedTuple, client_id: int) -> Params:
        """What this client receives (the global params, or e.g. a lower-rank view of them)."""
        ...


def state_signature(state: NamedTuple) -> str:
    """The nested state types, e.g. 'PipelineState(AdaptiveState)': what a checkpoint must match."""
    inner = [state_signature(v) for v in state if hasattr(v, "_asdict")]
    return type(state).__name__ + (f"({', '.join(inner)})" if inner else "")


def state_to_tensors(state: NamedTuple, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten a NamedTuple state: tensors (and dicts of tensors) to a flat dict, scalars to JSON."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for name, value in state._asdict().items():
        key = f"{prefix}{name}"
        if isinstance(value, torch.Tensor):
            tensors[key] = value
        elif isinstance(value, dict):
            tensors.update({f"{key}/{k}": v for k, v in value.items()})
        elif hasattr(value, "_asdict"):
            t, s = state_to_tensors(value, f"{key}.")
            tensors.update(t)
            scalars.update(s)
        else:
            scalars[key] = value
    return tensors, scalars


def state_from_tensors(
    template: NamedTuple, tensors: dict[str, torch.Tensor], scalars: dict[str, Any], prefix: str = ""
) -> NamedTuple:
    """Inverse of state_to_tensors, shaped by a template (``aggregator.init(params)``)."""
    values = {}
    for name, value in template._asdict().items():
        key = f"{prefix}{name}"
        if isinstance(value, torch.Tensor):
            values[name] = tensors[key]
        elif isinstance(value, dict):
            values[name] = {k: tensors[f"{key}/{k}"] for k in value}
        elif hasattr(value, "_asdict"):
            values[name] = state_from_tensors(value, tensors, scalars, f"{key}.")
        else:
            values[name] = scalars[key]
    return type(template)(**values)
