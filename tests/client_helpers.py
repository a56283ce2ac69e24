"""A parameter-sharing client handler over a given adapter and data, for tests that drive one directly."""

from __future__ import annotations

from fedtune.client.data import ClientData, EvalSettings
from fedtune.client.handler import ClientHandler
from fedtune.client.trainer import LocalTrainer
from fedtune.config import TrainingConfig
from fedtune.paradigms.parameter_sharing.client import ParameterSharingClient
from fedtune.wire.link import Link


def ps_handler(adapter, tok, data: dict[int, ClientData], cfg: TrainingConfig, total_rounds: int, seed: int):
    trainer = LocalTrainer(cfg, total_rounds, seed, tok.pad_token_id)
    client = ParameterSharingClient(
        adapter, tok, data, trainer, seed, EvalSettings(), Link(), Link(), adapter.get_state(), cfg.proximal_mu
    )
    return ClientHandler(client, data)
