"""SCAFFOLD, server side (Karimireddy et al. 2020, Algorithm 1).

Wraps any aggregator for the params (x <- x + η_g Δy with the inner server optimizer) and keeps
the server control variate c explicitly in the state:

    c <- c + (|S| / N) * mean_{i in S} Δc_i

Every client receives c with the params (``broadcast()["scaffold"]``, the request's ``scaffold_c``)
and returns Δc_i = c_i(new) − c_i(old) (``scaffold_delta_c``, the contribution's
``extras["scaffold"]``); the client half lives in ``fedtune.client.corrections``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from fedtune.aggregation.base import Aggregator, Contribution
from fedtune.core.types import Params


class ScaffoldState(NamedTuple):
    inner: NamedTuple
    control: dict[str, torch.Tensor]  # c, float32, same keys as the adapter
    rounds: int = 0


class Scaffold:
    def __init__(self, inner: Aggregator, num_clients: int):
        self.inner, self.num_clients = inner, num_clients
        self.name = f"scaffold+{inner.name}"

    def init(self, params: Params) -> ScaffoldState:
        zeros = {k: torch.zeros(v.shape, dtype=torch.float32) for k, v in params.items()}
        return ScaffoldState(self.inner.init(params), zeros)

    def broadcast(self, state: ScaffoldState) -> dict[str, Params]:
        return {**self.inner.broadcast(state.inner), "scaffold": state.control}

    def metrics(self, state: ScaffoldState) -> dict[str, float]:
        return self.inner.metrics(state.inner)

    def client_view(self, params: Params, state: ScaffoldState, client_id: int) -> Params:
        return self.inner.client_view(params, state.inner, client_id)

    def aggregate(
        self, params: Params, contributions: Sequence[Contribution], state: ScaffoldState
    ) -> tuple[Params, ScaffoldState]:
        new, inner = self.inner.aggregate(params, contributions, state.inner)
        ordered = sorted(contributions, key=lambda c: c.client_id)
        scale = 1.0 / self.num_clients  # (|S| / N) * mean over S  ==  (1 / N) * sum over S
        control = {}
        for k, c in state.control.items():
            acc = c.clone()
            for contrib in ordered:
                acc.add_(contrib.extras["scaffold"][k].to(torch.float32), alpha=scale)
            control[k] = acc
        return new, ScaffoldState(inner, control, state.rounds + 1)
