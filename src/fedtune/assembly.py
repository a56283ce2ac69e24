"""Build what a process needs from a config: model and adapter, encoder, codec links, client handler.

The server (experiment.py), every Ray worker and every deployed client call these same functions,
so each process builds a bit-identical base model, initial adapter and codec chain from one config.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from fedtune.adapters.adapter_model import AdapterModel
from fedtune.client.handler import ClientData, ClientHandler, EvalSettings
from fedtune.config import ExperimentConfig
from fedtune.data.formats import Example
from fedtune.data.prepare import BUILTIN, FederatedData, holdout_split
from fedtune.data.templates import resolve_template
from fedtune.data.tokenize import Encoder
from fedtune.evaluation.harness import EvalSet
from fedtune.models.loading import load_model
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
    loaded = load_model(
        cfg.model.name, cfg.model.dtype, cfg.model.revision, cfg.model.gguf_file, cfg.model.trust_remote_code
    )
    lora_mode = cfg.aggregation.lora_mode() if cfg.adapter.is_lora() else None
    adapter = AdapterModel(
        loaded.model,
        cfg.adapter,
        cfg.adapter.init_seed if cfg.adapter.init_seed is not None else cfg.seed,
        base_path=os.path.abspath(loaded.path),
        freeze_a=lora_mode == "ffa",
        extra_ranks=[cfg.adapter.rank_of_client(c) for c in range(cfg.partition.num_clients)],
    )
    if announce:
        log.info(
            "model %s loaded in %.1fs; adapter %s: %s trainable of %s parameters (%.3f%%)",
            cfg.model.name,
            time.perf_counter() - t,
            cfg.adapter.method + (" (DoRA)" if cfg.adapter.dora else ""),
            f"{adapter.num_trainable:,}",
            f"{adapter.num_total:,}",
            100 * adapter.num_trainable / adapter.num_total,
        )
    tokenizer = loaded.tokenizer
    d = cfg.data
    template = resolve_template(d.template, tokenizer)
    encoder = Encoder(tokenizer, template, d.system_prompt, d.max_seq_len, d.train_on_prompt)
    e = cfg.evaluation
    exact = d.dataset == BUILTIN if e.exact_match == "auto" else e.exact_match
    comp = cfg.compression
    return Workbench(
        adapter,
        tokenizer,
        encoder,
        adapter.get_state(),
        Link.from_specs([c.spec() for c in comp.uplink], comp.error_feedback),
        Link.from_specs([c.spec() for c in comp.downlink]),
        EvalSettings(e.batch_size, exact, e.max_new_tokens, e.group_by),
    )


def make_handler(cfg: ExperimentConfig, bench: Workbench, clients: dict[int, ClientData]) -> ClientHandler:
    """The client side of the protocol, serving these clients' data over the workbench's model."""
    return ClientHandler(
        bench.adapter,
        bench.tokenizer,
        clients,
        cfg.training,
        cfg.federation.rounds,
        cfg.seed,
        bench.eval_settings,
        progress=cfg.output.progress,
        uplink=bench.uplink,
        downlink=bench.downlink,
        initial=bench.initial,
    )


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
    import numpy as np

    encoded, n_trunc = encoder.encode_all(examples)
    if n_trunc:
        log.warning("%d of %d local examples were truncated to data.max_seq_len", n_trunc, len(encoded))
    return _client_data(examples, encoded, np.arange(len(examples)), encoder, cfg, cid)


def _client_data(examples, encoded, idx, encoder: Encoder, cfg: ExperimentConfig, cid: int) -> ClientData:
    train_idx, hold_idx = holdout_split(idx, cfg.partition.holdout_fraction, cfg.seed, cid)
    holdout = EvalSet.build([examples[i] for i in hold_idx], encoder) if len(hold_idx) else None
    return ClientData([encoded[i] for i in train_idx], holdout)
