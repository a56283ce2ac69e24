"""Client-side pieces for tests that drive them directly: a parameter-sharing handler, one trained round."""

from __future__ import annotations

from fedtune.assembly import Workbench, build_client_data, build_workbench
from fedtune.client.data import ClientData, EvalSettings
from fedtune.client.handler import ClientHandler
from fedtune.client.local_training import LocalResult
from fedtune.client.trainer import LocalTrainer
from fedtune.config import ExperimentConfig, TrainingConfig
from fedtune.data.prepare import prepare_federated_data
from fedtune.paradigms.parameter_sharing.client import ParameterSharingClient
from fedtune.wire.link import Link


def ps_handler(adapter, tok, data: dict[int, ClientData], cfg: TrainingConfig, total_rounds: int, seed: int):
    trainer = LocalTrainer(cfg, total_rounds, seed, tok.pad_token_id)
    client = ParameterSharingClient(
        adapter, tok, data, trainer, seed, EvalSettings(), Link(), Link(), adapter.get_state(), cfg.proximal_mu
    )
    return ClientHandler(client, data)


def train_client_round(cfg: ExperimentConfig, client: int = 1, round_index: int = 1) -> tuple[Workbench, LocalResult]:
    """Build ``cfg``'s workbench and data, and train ``client``'s adapter for one round with LocalTrainer."""
    bench = build_workbench(cfg, announce=False)
    data = build_client_data(prepare_federated_data(cfg.data, cfg.partition, cfg.seed), bench.encoder, cfg)
    trainer = LocalTrainer(cfg.training, cfg.federation.rounds, cfg.seed, bench.tokenizer.pad_token_id)
    return bench, trainer.train(bench.adapter, client, round_index, data[client]).result
