"""FedKSeed from a plan: the server over the run's candidate seeds; the zeroth-order client."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedtune.aggregation.weighting import WeightCap
from fedtune.client.data import ClientData
from fedtune.client.schedule import RoundSchedule
from fedtune.client.trainer import LocalTrainer
from fedtune.evaluation.harness import EvalSet
from fedtune.paradigms.fedkseed.client import FedKSeedClient
from fedtune.paradigms.fedkseed.server import FedKSeed, KSeedSettings
from fedtune.paradigms.fedkseed.settings import FedKSeedConfig, candidate_seeds
from fedtune.paradigms.plan import ParadigmPlan, Workbench

if TYPE_CHECKING:
    from fedtune.paradigms.base import EvaluateAdapter


def server(plan: ParadigmPlan, bench: Workbench, evaluate_adapter: EvaluateAdapter, weight_cap: WeightCap) -> FedKSeed:
    s: FedKSeedConfig = plan.settings  # type: ignore[assignment]
    t = plan.training
    settings = KSeedSettings(
        plan.num_clients, plan.aggregation.weighting, weight_cap, RoundSchedule.of(t, plan.rounds), t.zo_clip
    )
    return FedKSeed(bench.initial, candidate_seeds(plan.seed, s.candidates), settings, evaluate_adapter)


def client(plan: ParadigmPlan, bench: Workbench, data: dict[int, ClientData], eval_set: EvalSet | None = None):
    s: FedKSeedConfig = plan.settings  # type: ignore[assignment]
    trainer = LocalTrainer(plan.training, plan.rounds, plan.seed, bench.tokenizer.pad_token_id, plan.progress)
    seeds = candidate_seeds(plan.seed, s.candidates)
    return FedKSeedClient(bench.adapter, data, trainer, bench.initial, seeds, importance=s.sampling == "importance")
