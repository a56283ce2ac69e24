"""Build what a process needs from a config: model and adapter, encoder, codec links, client handler.

The server (experiment.py), every Ray worker and every deployed client call these same functions,
so each process builds a bit-identical base model, initial adapter and codec chain from one config.
The client handler serves the paradigm ``cfg.paradigm`` names (``registry.PARADIGMS``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from fedtune.adapters.adapter_model import AdapterModel
from fedtune.adapters.build import seeded_adapter
from fedtune.client.data import ClientData, EvalSettings
from fedtune.client.handler import ClientHandler
from fedtune.config import ExperimentConfig
from fedtune.data.formats import Example, load_examples
from fedtune.data.prepare import BUILTIN, FederatedData, holdout_split, load_splits, prepare_federated_data
from fedtune.data.templates import resolve_template
from fedtune.data.tokenize import Encoder
from fedtune.errors import DataError
from fedtune.evaluation.harness import EvalSet
from fedtune.models.device import model_device
from fedtune.privacy.plan import rounds_to_run
from fedtune.registry import PARADIGMS
from fedtune.types import Params
from fedtune.wire.link import Link

log = logging.getLogger("fedtune")


@dataclass
class Workbench:
    """One process's model side: the base model with its adapter, and how text and tensors are encoded."""

    adapter: AdapterModel
    tokenizer: PreTrainedTokenizerBase
    encoder: Encoder
    initial: Params  # the seeded initial adapter: what every client holds before round 1
    uplink: Link
    downlink: Link
    eval_settings: EvalSettings


def build_workbench(cfg: ExperimentConfig, announce: bool = True) -> Workbench:
    """Load the base model, attach the seeded adapter, and build the encoder and codec links."""
    t = time.perf_counter()
    adapter, tokenizer = seeded_adapter(cfg)
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
    d = cfg.data
    template = resolve_template(d.template, tokenizer)
    encoder = Encoder(tokenizer, template, d.system_prompt, d.max_seq_len, d.train_on_prompt)
    e = cfg.evaluation
    exact = d.dataset == BUILTIN if e.exact_match == "auto" else bool(e.exact_match)
    final = rounds_to_run(cfg) if e.exact_match == "final" else None
    comp = cfg.compression
    return Workbench(
        adapter,
        tokenizer,
        encoder,
        adapter.get_state(),
        Link.from_specs([c.spec() for c in comp.uplink], comp.error_feedback),
        Link.from_specs([c.spec() for c in comp.downlink]),
        EvalSettings(e.batch_size, exact, e.max_new_tokens, e.group_by, final),
    )


def make_handler(
    cfg: ExperimentConfig, bench: Workbench, clients: dict[int, ClientData], eval_set: EvalSet | None = None
) -> ClientHandler:
    """The client side of ``cfg.paradigm``, serving these clients' data over the workbench's model.

    ``eval_set``: the federation's evaluation set, for paradigms whose clients evaluate their own models.
    """
    paradigm = PARADIGMS.load(cfg.paradigm).client(cfg, bench, clients, eval_set)
    return ClientHandler(paradigm, clients)


def simulation_handler(cfg_json: dict[str, Any]) -> Any:
    """A handler for every simulated client, built from scratch as the server builds it (a Ray worker's)."""
    cfg = ExperimentConfig.model_validate(cfg_json)
    cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"progress": False})})
    bench = build_workbench(cfg, announce=False)
    data = prepare_federated_data(cfg.data, cfg.partition, cfg.split_seed())
    eval_set = EvalSet.build(eval_subset(data.eval, cfg.evaluation.max_samples), bench.encoder)
    return make_handler(cfg, bench, build_client_data(data, bench.encoder, cfg), eval_set).handle


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
            examples = load_examples(d.eval_dataset)
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
