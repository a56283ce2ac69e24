"""Build what a process needs from a config: its plan, model and adapter, encoder, codec links, client handler.

The server (experiment.py), every Ray worker and every deployed client call these same functions,
so each process builds a bit-identical base model, initial adapter and codec chain from one config.
``plan_of`` is where a config becomes what the layers below receive: the resolved sections, the
privacy plan (made once), and this process's placement. The client handler serves the paradigm the
config names.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from fedtune.adapters.build import seeded_adapter
from fedtune.client.data import ClientData, EvalSettings
from fedtune.config import ExperimentConfig, resolve
from fedtune.config.experiment import gpu_misfit, joint_misfit
from fedtune.core.errors import DataError
from fedtune.data.formats import Example
from fedtune.data.prepare import (
    GENERATED,
    FederatedData,
    holdout_split,
    load_data_file,
    load_splits,
    prepare_federated_data,
)
from fedtune.data.templates import resolve_template
from fedtune.data.tokenize import Encoder
from fedtune.evaluation.harness import EvalSet
from fedtune.models.device import model_device
from fedtune.models.loading import load_tokenizer
from fedtune.models.placement import Placement, place
from fedtune.paradigms.handler import ClientHandler
from fedtune.paradigms.plan import ParadigmPlan, Workbench
from fedtune.privacy.plan import PrivacyPlan, plan_privacy
from fedtune.wire.link import Link

log = logging.getLogger("fedtune")


def placement_of(cfg: ExperimentConfig) -> Placement:
    """Where this process runs the config's work (``model.device``, lanes, joint clients), resolved here."""
    return place(cfg.model, cfg.runtime, cfg.clients_per_round(), gpu_misfit(cfg), joint_misfit(cfg))


_PLAN_HERE = object()  # plan_of's default: make the privacy plan in this process


def plan_of(cfg: ExperimentConfig, privacy: PrivacyPlan | object | None = _PLAN_HERE) -> ParadigmPlan:
    """The config as the layers below receive it: its sections resolved (``config.resolve``), the privacy plan
    (made here unless given, None included: a Ray worker gets the driver's) and this process's placement."""
    cfg = resolve(cfg)
    if privacy is _PLAN_HERE:
        privacy = plan_privacy(cfg.privacy, cfg.partition.num_clients, cfg.clients_per_round(), cfg.federation.rounds)
    return ParadigmPlan(
        settings=cfg.paradigm,
        seed=cfg.seed,
        split_seed=cfg.split_seed(),
        rounds=cfg.federation.rounds,
        num_clients=cfg.partition.num_clients,
        clients_per_round=cfg.clients_per_round(),
        model=cfg.model,
        adapter=cfg.adapter,
        data=cfg.data,
        training=cfg.training,
        aggregation=cfg.aggregation,
        compression=cfg.compression,
        privacy=cfg.privacy,
        privacy_plan=privacy,  # type: ignore[arg-type]
        placement=placement_of(cfg),
        progress=cfg.output.progress,
    )


def build_workbench(cfg: ExperimentConfig, plan: ParadigmPlan, announce: bool = True, model: bool = True) -> Workbench:
    """Load the base model, attach the seeded adapter, and build the encoder and codec links.

    ``model=False``: the tokenizer alone (no weights read), for a client process of a paradigm whose clients
    get their model in messages (``Capabilities.client_base``); the workbench then has no adapter."""
    t = time.perf_counter()
    if not model:
        m = cfg.model
        tokenizer = load_tokenizer(m.name, m.revision, m.trust_remote_code, m.gguf_file)
        return _workbench(cfg, plan, None, tokenizer)
    adapter, tokenizer = seeded_adapter(plan.adapter_recipe())
    if announce:
        log.info(
            "model %s loaded in %.1fs on %s; adapter %s: %s trainable of %s parameters (%.3f%%)",
            cfg.model.name,
            time.perf_counter() - t,
            model_device(adapter.model),
            cfg.adapter.method + (" (DoRA)" if cfg.adapter.dora else ""),
            f"{adapter.num_trainable:,}",
            f"{adapter.num_total:,}",
            100 * adapter.num_trainable / adapter.num_total,
        )
    return _workbench(cfg, plan, adapter, tokenizer)


def client_workbench(cfg: ExperimentConfig, plan: ParadigmPlan, announce: bool = False) -> Workbench:
    """A client process's workbench: with the base model unless its paradigm's clients are sent theirs."""
    return build_workbench(cfg, plan, announce, model=cfg.plugin().capabilities.client_base)


def _workbench(cfg: ExperimentConfig, plan: ParadigmPlan, adapter, tokenizer) -> Workbench:
    d = cfg.data
    template = resolve_template(d.template, tokenizer)
    encoder = Encoder(tokenizer, template, d.system_prompt, d.max_seq_len, d.train_on_prompt)
    e = cfg.evaluation
    exact = d.dataset in GENERATED if e.exact_match == "auto" else bool(e.exact_match)
    final = plan.rounds_to_run if e.exact_match == "final" else None
    comp = cfg.compression
    return Workbench(
        adapter,
        tokenizer,
        encoder,
        adapter.get_state() if adapter is not None else {},
        Link.from_specs([c.spec() for c in comp.uplink], comp.error_feedback),
        Link.from_specs([c.spec() for c in comp.downlink]),
        EvalSettings(e.batch_size, exact, e.max_new_tokens, e.group_by, final),
    )


def make_handler(
    plan: ParadigmPlan, bench: Workbench, clients: dict[int, ClientData], eval_set: EvalSet | None = None
) -> ClientHandler:
    """The client side of the plan's paradigm, serving these clients' data over the workbench's model.

    ``eval_set``: the federation's evaluation set, for paradigms whose clients evaluate their own models.
    """
    paradigm = plan.settings.plugin().halves().client(plan, bench, clients, eval_set)
    return ClientHandler(paradigm, clients)


def simulation_handler(cfg_json: dict[str, Any], privacy: PrivacyPlan | None) -> Any:
    """A handler for every simulated client, built from scratch as the server builds it (a Ray worker's),
    with the driver's privacy plan."""
    cfg = ExperimentConfig.model_validate(cfg_json)
    cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"progress": False})})
    plan = plan_of(cfg, privacy)
    bench = client_workbench(cfg, plan)
    data = prepare_federated_data(cfg.data, cfg.partition, cfg.split_seed())
    eval_set = EvalSet.build(eval_subset(data.eval, cfg.evaluation.max_samples), bench.encoder)
    return make_handler(plan, bench, build_client_data(data, bench.encoder, cfg), eval_set).handle


def federation_eval_set(cfg: ExperimentConfig, encoder: Encoder) -> EvalSet | None:
    """The federation's evaluation set as the server builds it, if this machine has its data; else None.

    For a deployed client: built-in data is generated; a file dataset needs ``data.eval_dataset`` (or
    ``data.dataset``, which the eval share is split from) on this machine too.
    """
    d = cfg.data
    try:
        if d.dataset.startswith("builtin:") or d.eval_dataset is None:
            examples = load_splits(d, cfg.split_seed())[1]
        else:
            examples = load_data_file(d, d.eval_dataset)
    except DataError as exc:
        log.info("no federation evaluation set on this machine (%s)", exc)
        return None
    return EvalSet.build(eval_subset(examples, cfg.evaluation.max_samples), encoder)


def eval_subset(examples: list, max_samples: int | None) -> list:
    """A fixed (seed-independent) sample, so that runs with different seeds share one eval set."""
    if max_samples is None or max_samples >= len(examples):
        return examples
    keep = sorted(np.random.default_rng(0).permutation(len(examples))[:max_samples])
    return [examples[i] for i in keep]


def build_client_data(data: FederatedData, encoder: Encoder, cfg: ExperimentConfig) -> dict[int, ClientData]:
    """Every simulated client's share of the partitioned training data, encoded."""
    encoded, n_trunc = encoder.encode_all(data.train)
    if n_trunc:
        log.warning(
            "%d of %d training examples exceed data.max_seq_len=%d and were truncated",
            n_trunc,
            len(encoded),
            cfg.data.max_seq_len,
        )
    return {cid: _client_data(data.train, encoded, idx, encoder, cfg, cid) for cid, idx in enumerate(data.parts)}


def local_client_data(examples: list[Example], encoder: Encoder, cfg: ExperimentConfig, cid: int) -> ClientData:
    """A deployed client's own examples, split exactly as the same shard would be in simulation."""
    encoded, n_trunc = encoder.encode_all(examples)
    if n_trunc:
        log.warning("%d of %d local examples were truncated to data.max_seq_len", n_trunc, len(encoded))
    return _client_data(examples, encoded, np.arange(len(examples)), encoder, cfg, cid)


def _client_data(examples, encoded, idx, encoder: Encoder, cfg: ExperimentConfig, cid: int) -> ClientData:
    train_idx, hold_idx = holdout_split(idx, cfg.partition.holdout_fraction, cfg.split_seed(), cid)
    holdout = EvalSet.build([examples[i] for i in hold_idx], encoder) if len(hold_idx) else None
    return ClientData([encoded[i] for i in train_idx], holdout)
