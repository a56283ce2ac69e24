"""Split-FedLLM from a config: the cut, the server's part and its aggregators, the clients' part."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from fedtune.adapters.split import Cut, SplitModel, full_names
from fedtune.aggregation import build_aggregator
from fedtune.client.data import ClientData
from fedtune.evaluation.harness import EvalSet
from fedtune.paradigms.split.client import SplitClient, SplitClientSettings
from fedtune.paradigms.split.server import SplitLearning, SplitSettings
from fedtune.wire.link import Link

if TYPE_CHECKING:
    from fedtune.aggregation.weighting import WeightCap
    from fedtune.assembly import Workbench
    from fedtune.config import ExperimentConfig

log = logging.getLogger("fedtune")


def split_model(cfg: ExperimentConfig, bench: Workbench) -> tuple[SplitModel, dict[str, str], list[str], list[str]]:
    """The cut model, adapter name -> full parameter name, and the (client, server) adapter tensor names."""
    s = cfg.split
    split = SplitModel(bench.adapter.model, Cut(s.client_front, s.back(), s.shape))
    names = full_names(bench.adapter.model, bench.adapter.params)
    client, server = split.partition(bench.adapter.params)
    return split, names, client, server


def activation_link(cfg: ExperimentConfig) -> Link:
    return Link.from_specs(cfg.split.activation_codecs)


def server(cfg: ExperimentConfig, bench: Workbench, evaluate_adapter, weight_cap: WeightCap) -> SplitLearning:
    split, names, client, server_names = split_model(cfg, bench)
    s, n = cfg.split, cfg.partition.num_clients
    alpha = cfg.adapter.alpha if cfg.adapter.is_lora() else None
    aggregator = build_aggregator(cfg.aggregation, n, alpha)
    server_aggregator = build_aggregator(cfg.aggregation, n, alpha) if s.server_part == "per_client" else None
    cut = split.cut
    log.info(
        "split: shape %s; client blocks %s, server blocks %d-%d of %d; server part %s; activations %s",
        cut.shape,
        f"0-{cut.front - 1}" + (f" and {split.layers - cut.back}-{split.layers - 1}" if cut.back else ""),
        cut.front,
        split.layers - cut.back - 1,
        split.layers,
        "shared, clients in turn (SplitFed v2)" if s.server_part == "shared" else "one copy per client (SplitFed v1)",
        activation_link(cfg).describe(),
    )
    if cut.shape == "vanilla":
        log.warning(
            "split.shape=vanilla: the server runs the LM head and the loss, so every client sends its next-token "
            "labels, i.e. the text of its training examples; use split.shape=u to keep them on the clients"
        )
    settings = SplitSettings(
        s.shape,
        s.server_part,
        n,
        cfg.seed,
        cfg.aggregation.weighting,
        weight_cap,
        cfg.training,
        cfg.federation.rounds,
        cfg.data.max_seq_len,
    )
    return SplitLearning(
        split,
        names,
        client,
        server_names,
        aggregator,
        server_aggregator,
        settings,
        bench.initial,
        bench.uplink,
        bench.downlink,
        activation_link(cfg),
        evaluate_adapter,
    )


def client(
    cfg: ExperimentConfig, bench: Workbench, data: dict[int, ClientData], eval_set: EvalSet | None = None
) -> SplitClient:
    split, names, client_names, _ = split_model(cfg, bench)
    settings = SplitClientSettings(cfg.training, cfg.federation.rounds, cfg.seed, bench.tokenizer.pad_token_id)
    return SplitClient(
        split,
        {k: names[k] for k in client_names},
        {k: bench.adapter.params[k] for k in client_names},
        data,
        settings,
        bench.uplink,
        bench.downlink,
        activation_link(cfg),
    )
