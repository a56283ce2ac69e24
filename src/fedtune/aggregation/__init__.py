"""Server-side aggregation: pure (init, aggregate) pairs with explicit state.

``build_aggregator(AggregationConfig(...))`` assembles clip -> combine -> server optimizer, the one
factory of every aggregator a run uses (DP-FedAvg's noised mean is its ``mean`` stage).
"""

from __future__ import annotations

from functools import partial

from fedtune.aggregation.base import Aggregator, Contribution
from fedtune.aggregation.combine import Combiner
from fedtune.aggregation.hierarchy import Hierarchy, HierarchyState
from fedtune.aggregation.lora import LoraExact, LoraNaive, LoraZeroPad
from fedtune.aggregation.pipeline import CombineStage, Pipeline, PipelineState
from fedtune.aggregation.scaffold import Scaffold, ScaffoldState
from fedtune.aggregation.server_opt import ServerOptimizer
from fedtune.config import AggregationConfig
from fedtune.core.registry import AGGREGATORS as _AGGREGATORS
from fedtune.core.registry import COMBINERS as _COMBINERS
from fedtune.wire.link import Link

AGGREGATORS = _AGGREGATORS.names()
COMBINERS = _COMBINERS.names()


def server_optimizer(cfg: AggregationConfig) -> ServerOptimizer:
    """The server optimizer ``aggregation.name`` names, with its options from the config."""
    return _AGGREGATORS.load(cfg.name)(**_AGGREGATORS.kwargs(cfg.name, cfg))


def combiner(cfg: AggregationConfig) -> Combiner:
    """The combiner ``aggregation.combine`` names, with its options from the config."""
    kwargs = _COMBINERS.kwargs(cfg.combine, cfg)
    fn = _COMBINERS.load(cfg.combine)
    return partial(fn, **kwargs) if kwargs else fn


def build_aggregator(
    cfg: AggregationConfig | None = None,
    num_clients: int | None = None,
    lora_alpha: float | None = None,
    client_ranks: dict[int, int] | None = None,
    align_lora: bool = False,
    mean: CombineStage | None = None,
    seed: int = 0,
    **fields,
) -> Aggregator:
    """An aggregator from config (or keyword fields: ``build_aggregator(name="fedyogi", combine="median")``).

    SCAFFOLD (``scaffold=True``) needs the federation size ``num_clients`` for its control update.
    With ``lora_alpha`` (the adapter's LoRA alpha) the params are treated as LoRA pairs and
    ``cfg.lora_mode()`` picks exact, naive (error reported) or ffa aggregation; without it, plain tensors.
    ``client_ranks`` (client id -> LoRA rank, for clients below the global rank) selects FlexLoRA
    (exact) or HetLoRA zero-padding (naive). ``align_lora`` keeps exact-mode factors close to the
    previous round's (same products; see ``refactor``). ``mean``: a combine stage in place of
    ``aggregation.combine`` (client-level DP's noised mean, ``PrivacyPlan.mean``: DP-FedAvg, or DP-FedOpt
    with another server optimizer), over A and B apart in LoRA naive mode. ``aggregation.edges``: the server's
    aggregator over edge aggregators (``hierarchy.py``; ``seed`` keys the edges' uplink codec draws).
    """
    cfg = AggregationConfig(**fields) if cfg is None else cfg
    if cfg.edges:
        return _hierarchy(cfg, num_clients, lora_alpha, client_ranks, align_lora, mean, seed)
    mode = cfg.lora_mode() if lora_alpha is not None else "plain"
    if mean is not None:
        if mode == "exact" or client_ranks or cfg.scaffold or cfg.clip_norm is not None:
            raise ValueError(
                "a noised mean sums clipped updates: it takes no exact LoRA, client ranks, SCAFFOLD or clip_norm"
            )
        dp: Aggregator = Pipeline(f"dp_{cfg.name}", mean, server_optimizer(cfg))
        return LoraNaive(dp, lora_alpha) if mode == "naive" else dp
    if mode == "exact":
        return LoraExact(lora_alpha, cfg.clip_norm, client_ranks, align=align_lora)
    if client_ranks and mode == "naive":
        return LoraZeroPad(lora_alpha, client_ranks, cfg.clip_norm)
    if client_ranks:
        raise ValueError(f"heterogeneous client ranks need aggregation.lora exact or naive, not {mode}")
    agg: Aggregator = Pipeline(cfg.name, combiner(cfg), server_optimizer(cfg), cfg.clip_norm)
    if cfg.scaffold:
        if num_clients is None:
            raise ValueError("SCAFFOLD needs num_clients (the federation size N) for c <- c + |S|/N mean(dc)")
        agg = Scaffold(agg, num_clients)
    if mode == "naive":
        agg = LoraNaive(agg, lora_alpha)
    return agg


def _hierarchy(cfg, num_clients, lora_alpha, client_ranks, align_lora, mean, seed) -> Aggregator:
    if mean is not None or client_ranks:
        raise ValueError("aggregation.edges: client-level DP's noised mean and client ranks act per client, not edge")
    if num_clients is None or cfg.edges > num_clients:
        raise ValueError(f"aggregation.edges={cfg.edges} needs at least as many clients ({num_clients})")
    flat = cfg.model_copy(update={"edges": 0, "edge": {}, "edge_uplink": []})
    server = build_aggregator(flat, num_clients, lora_alpha, None, align_lora)
    edge_cfg = cfg.edge_config()

    def make_edge() -> Aggregator:
        return build_aggregator(edge_cfg, num_clients, lora_alpha, None, align_lora)

    uplink = Link.from_specs([c.spec() for c in cfg.edge_uplink])
    return Hierarchy(server, make_edge, cfg.edges, num_clients, uplink, seed)


def fedavg() -> Pipeline:
    """Plain FedAvg (McMahan et al. 2017): weighted mean of deltas, applied with server lr 1."""
    return build_aggregator(AggregationConfig())


__all__ = [
    "AGGREGATORS",
    "COMBINERS",
    "Aggregator",
    "Contribution",
    "Hierarchy",
    "HierarchyState",
    "Pipeline",
    "PipelineState",
    "Scaffold",
    "ScaffoldState",
    "build_aggregator",
    "fedavg",
]
