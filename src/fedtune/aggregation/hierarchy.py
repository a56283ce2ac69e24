"""Hierarchical aggregation: clients -> edge aggregators -> the server (docs/algorithms/hierarchical.md).

Each edge e aggregates the updates of its clients S_e with its own aggregator (any of this package's, its
state its own) into an edge update Δ_e = x_e' − x, weighted by W_e = Σ_{k∈S_e} w_k; Δ_e crosses the edge's
uplink (a codec chain, its bytes counted) and the server aggregates the edges' updates with its aggregator.
With FedAvg at both levels on plain tensors (or LoRA factors averaged apart):

    Σ_e W_e · (Σ_{k∈S_e} w_k Δ_k / W_e) / Σ_e W_e  =  Σ_k w_k Δ_k / Σ_k w_k

the flat FedAvg (tested to float rounding). Exact LoRA aggregation truncates each edge's mean of products to
rank r before the server sees it, so two levels then differ from one (the truncation errors are reported).
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from fedtune.aggregation.base import Aggregator, Contribution
from fedtune.core import rng
from fedtune.core.types import Params
from fedtune.wire.link import Link
from fedtune.wire.serialize import encode


class HierarchyState(NamedTuple):
    server: NamedTuple  # the server's aggregator's state
    edges: NamedTuple  # edge0, edge1, ...: each edge's aggregator's state
    rounds: int = 0
    edge_bytes_up: int = 0  # the last round's bytes from edges to the server (the edge uplink's wire tensors)
    edge_bytes_down: int = 0  # the last round's bytes from the server to the edges (the adapter, once per edge)
    edges_used: int = 0  # edges with at least one update in the last round


def edge_of(client: int, edges: int, num_clients: int) -> int:
    """The edge a client belongs to: contiguous blocks of the client ids."""
    return client * edges // num_clients


class Hierarchy:
    """The server's aggregator over ``edges`` edge aggregators; a client's edge is ``edge_of``."""

    def __init__(
        self,
        server: Aggregator,
        make_edge: Callable[[], Aggregator],
        edges: int,
        num_clients: int,
        uplink: Link,
        seed: int,
    ):
        self.server, self.edge_aggs = server, [make_edge() for _ in range(edges)]
        self.edges, self.num_clients, self.uplink, self.seed = edges, num_clients, uplink, seed
        self.name = f"{self.edge_aggs[0].name} at {edges} edges, {server.name} at the server"
        self._edge_states = namedtuple("EdgeStates", [f"edge{e}" for e in range(edges)])  # type: ignore[misc]

    def init(self, params: Params) -> NamedTuple:
        return HierarchyState(self.server.init(params), self._edge_states(*(a.init(params) for a in self.edge_aggs)))

    def broadcast(self, state: NamedTuple) -> dict[str, Params]:
        return {}

    def client_view(self, params: Params, state: NamedTuple, client_id: int) -> Params:
        return params

    def metrics(self, state: NamedTuple) -> dict[str, Any]:
        out: dict[str, Any] = {
            "edge_bytes_up": state.edge_bytes_up,
            "edge_bytes_down": state.edge_bytes_down,
            "edges_used": state.edges_used,
        }
        out.update(self.server.metrics(state.server))
        per_edge = [self.edge_aggs[e].metrics(s) for e, s in enumerate(state.edges)]
        for key in sorted({k for m in per_edge for k in m}):
            values = [m[key] for m in per_edge if isinstance(m.get(key), int | float)]
            if values:
                out[f"edge_{key}_max"] = max(values)
        return out

    def aggregate(
        self, params: Params, contributions: Sequence[Contribution], state: NamedTuple
    ) -> tuple[Params, NamedTuple]:
        r = state.rounds + 1
        groups: dict[int, list[Contribution]] = {}
        for c in sorted(contributions, key=lambda c: c.client_id):
            groups.setdefault(edge_of(c.client_id, self.edges, self.num_clients), []).append(c)
        edge_states = list(state.edges)
        up = 0
        forwarded: list[Contribution] = []
        for e, group in sorted(groups.items()):
            edge_params, edge_states[e] = self.edge_aggs[e].aggregate(params, group, edge_states[e])
            delta = {k: edge_params[k] - params[k] for k in params}
            wire, _ = self.uplink.encode(delta, {}, rng.torch_generator(rng.EDGE_UPLINK, self.seed, r, index=e))
            up += len(encode(wire))
            forwarded.append(Contribution(e, self.uplink.decode(wire, params), float(sum(c.weight for c in group))))
        new, server_state = (
            self.server.aggregate(params, forwarded, state.server) if forwarded else (params, state.server)
        )
        down = len(encode(dict(params))) * len(groups)  # the adapter to every edge whose clients took part
        return new, HierarchyState(server_state, self._edge_states(*edge_states), r, up, down, len(groups))
