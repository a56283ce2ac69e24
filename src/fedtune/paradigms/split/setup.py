"""Split-FedLLM from a plan: the cut, the server's part and its aggregators, the clients' part."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from fedtune.adapters.split import Cut, SplitModel, full_names
from fedtune.aggregation import build_aggregator
from fedtune.client.data import ClientData
from fedtune.evaluation.harness import EvalSet
from fedtune.paradigms.plan import ParadigmPlan, Workbench
from fedtune.paradigms.split.client import SplitClient, SplitClientSettings
from fedtune.paradigms.split.server import SplitLearning, SplitSettings
from fedtune.wire.link import Link

if TYPE_CHECKING:
    from fedtune.aggregation.weighting import WeightCap
    from fedtune.paradigms.base import EvaluateAdapter
    from fedtune.paradigms.split.settings import SplitConfig

log = logging.getLogger("fedtune")


def _split(plan: ParadigmPlan) -> SplitConfig:
    return plan.settings  # type: ignore[return-value]  (the plan of paradigm split carries its settings)


def split_model(plan: ParadigmPlan, bench: Workbench) -> tuple[SplitModel, dict[str, str], list[str], list[str]]:
    """The cut model, adapter name -> full parameter name, and the (client, server) adapter tensor names."""
    s = _split(plan)
    split = SplitModel(bench.adapter.model, Cut(s.client_front, s.back(), s.shape))
    names = full_names(bench.adapter.model, bench.adapter.params)
    client, server = split.partition(bench.adapter.params)
    return split, names, client, server


def activation_link(plan: ParadigmPlan) -> Link:
    return Link.from_specs(_split(plan).activation_codecs)


def server(plan: ParadigmPlan, bench: Workbench, evaluate_adapter: EvaluateAdapter, weight_cap: WeightCap):
    split, names, client, server_names = split_model(plan, bench)
    s, n = _split(plan), plan.num_clients
    alpha = plan.adapter.alpha if plan.adapter.is_lora() else None
    aggregator = build_aggregator(plan.aggregation, n, alpha)
    server_aggregator = build_aggregator(plan.aggregation, n, alpha) if s.server_part == "per_client" else None
    cut = split.cut
    log.info(
        "split: shape %s; client blocks %s, server blocks %d-%d of %d; server part %s; activations %s",
        cut.shape,
        f"0-{cut.front - 1}" + (f" and {split.layers - cut.back}-{split.layers - 1}" if cut.back else ""),
        cut.front,
        split.layers - cut.back - 1,
        split.layers,
        "shared, clients in turn (SplitFed v2)" if s.server_part == "shared" else "one copy per client (SplitFed v1)",
        activation_link(plan).describe(),
    )
    if cut.shape == "vanilla":
        log.warning(
            "paradigm.shape=vanilla: the server runs the LM head and the loss, so every client sends its next-token "
            "labels, i.e. the text of its training examples; use shape u to keep them on the clients"
        )
    settings = SplitSettings(
        s.shape,
        s.server_part,
        n,
        plan.seed,
        plan.aggregation.weighting,
        weight_cap,
        plan.training,
        plan.rounds,
        plan.data.max_seq_len,
        s.max_micro_batches,
        plan.update_bound(weight_cap.max_examples, {k: bench.initial[k] for k in client}, "a client part"),
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
        activation_link(plan),
        evaluate_adapter,
    )


def client(plan: ParadigmPlan, bench: Workbench, data: dict[int, ClientData], eval_set: EvalSet | None = None):
    split, names, client_names, _ = split_model(plan, bench)
    settings = SplitClientSettings(
        plan.training, plan.rounds, plan.seed, bench.tokenizer.pad_token_id, _split(plan).max_micro_batches
    )
    return SplitClient(
        split,
        {k: names[k] for k in client_names},
        {k: bench.adapter.params[k] for k in client_names},
        data,
        settings,
        bench.uplink,
        bench.downlink,
        activation_link(plan),
    )
