"""A config's pieces built as a run builds them, for tests that drive them directly: its plan and workbench,
its clients' data, a paradigm's halves, a parameter-sharing handler, one trained round."""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.assembly import build_client_data, build_workbench, eval_subset, make_handler, plan_of
from fedtune.client.data import ClientData, EvalSettings
from fedtune.client.local_training import LocalResult
from fedtune.client.trainer import LocalTrainer
from fedtune.config import ExperimentConfig, TrainingConfig
from fedtune.data.prepare import FederatedData, prepare_federated_data
from fedtune.evaluation.harness import EvalSet
from fedtune.experiment import weight_cap
from fedtune.paradigms.handler import ClientHandler
from fedtune.paradigms.parameter_sharing.client import ParameterSharingClient
from fedtune.paradigms.plan import ParadigmPlan, Workbench
from fedtune.wire.link import Link


@dataclass
class Built:
    """What a run builds from ``cfg`` in one process, before its first round."""

    cfg: ExperimentConfig
    plan: ParadigmPlan
    bench: Workbench
    federated: FederatedData
    clients: dict[int, ClientData]
    eval_set: EvalSet

    def server(self, evaluate_adapter=None):
        """The paradigm's server half, as the experiment builds it."""
        halves = self.cfg.plugin().halves()
        return halves.server(self.plan, self.bench, evaluate_adapter, weight_cap(self.cfg, self.federated))

    def handler(self) -> ClientHandler:
        """The client side serving every simulated client, as the in-process runtime gets it."""
        return make_handler(self.plan, self.bench, self.clients, self.eval_set)


def build(cfg: ExperimentConfig) -> Built:
    """``cfg``'s plan, workbench, data and evaluation set, built as ``experiment.run_experiment`` builds them."""
    plan = plan_of(cfg)
    bench = build_workbench(cfg, plan, announce=False)
    federated = prepare_federated_data(cfg.data, cfg.partition, cfg.split_seed())
    clients = build_client_data(federated, bench.encoder, cfg)
    eval_set = EvalSet.build(eval_subset(federated.eval, cfg.evaluation.max_samples), bench.encoder)
    return Built(cfg, plan, bench, federated, clients, eval_set)


def ps_handler(adapter, tok, data: dict[int, ClientData], cfg: TrainingConfig, total_rounds: int, seed: int):
    trainer = LocalTrainer(cfg, total_rounds, seed, tok.pad_token_id)
    client = ParameterSharingClient(
        adapter, tok, data, trainer, seed, EvalSettings(), Link(), Link(), adapter.get_state(), cfg.proximal_mu
    )
    return ClientHandler(client, data)


def train_client_round(cfg: ExperimentConfig, client: int = 1, round_index: int = 1) -> tuple[Workbench, LocalResult]:
    """Build ``cfg``'s workbench and data, and train ``client``'s adapter for one round with LocalTrainer."""
    built = build(cfg)
    bench = built.bench
    trainer = LocalTrainer(cfg.training, cfg.federation.rounds, cfg.seed, bench.tokenizer.pad_token_id)
    return bench, trainer.train(bench.adapter, client, round_index, built.clients[client]).result
