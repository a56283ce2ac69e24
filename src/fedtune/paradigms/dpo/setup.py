"""Federated DPO from a plan: parameter sharing's server, its client with the preference loss over pairs."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from fedtune.aggregation.weighting import WeightCap
from fedtune.client.data import ClientData
from fedtune.data.tokenize import collate_pairs
from fedtune.evaluation.harness import EvalSet
from fedtune.paradigms.dpo.client import DpoClient, check_pairs
from fedtune.paradigms.dpo.settings import DpoConfig
from fedtune.paradigms.parameter_sharing import setup as sharing
from fedtune.paradigms.plan import ParadigmPlan, Workbench

if TYPE_CHECKING:
    from fedtune.paradigms.base import EvaluateAdapter

log = logging.getLogger("fedtune")


def server(plan: ParadigmPlan, bench: Workbench, evaluate_adapter: EvaluateAdapter, weight_cap: WeightCap):
    s: DpoConfig = plan.settings  # type: ignore[assignment]
    loss = f"DPO (β {s.beta:g}" + (f", label smoothing {s.label_smoothing:g})" if s.label_smoothing else ")")
    log.info(
        "dpo: each client's local loss is %s over its preference pairs, against %s",
        loss if s.loss == "sigmoid" else f"IPO (τ {s.beta:g})",
        "the global model its round starts from" if s.reference == "round" else "the initial adapter",
    )
    return sharing.server(plan, bench, evaluate_adapter, weight_cap)


def client(plan: ParadigmPlan, bench: Workbench, data: dict[int, ClientData], eval_set: EvalSet | None = None):
    for client_id, share in data.items():
        check_pairs(share, client_id)
    return sharing.client(plan, bench, data, eval_set, DpoClient, collate=collate_pairs, settings=plan.settings)
