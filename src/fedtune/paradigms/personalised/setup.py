"""Personalised FL from a plan: parameter sharing over the shared tensors on the server, its client with a
personal adapter kept in client state."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from fedtune.aggregation.weighting import WeightCap
from fedtune.client.data import ClientData
from fedtune.client.trainer import LocalTrainer
from fedtune.core.types import Params
from fedtune.evaluation.harness import EvalSet
from fedtune.paradigms.parameter_sharing import setup as sharing
from fedtune.paradigms.personalised.client import PersonalisedClient
from fedtune.paradigms.personalised.parts import personal_names
from fedtune.paradigms.personalised.server import Personalised
from fedtune.paradigms.personalised.settings import PersonalisedConfig
from fedtune.paradigms.plan import ParadigmPlan, Workbench

if TYPE_CHECKING:
    from fedtune.paradigms.base import EvaluateAdapter

log = logging.getLogger("fedtune")


def _personal(plan: ParadigmPlan, bench: Workbench) -> frozenset[str]:
    """The split's personal tensors (FedPer, FedRep); none for the methods that keep a whole personal adapter."""
    s: PersonalisedConfig = plan.settings  # type: ignore[assignment]
    if not s.splits():
        return frozenset()
    assert bench.adapter is not None  # parameter sharing's processes hold the model
    return personal_names(sorted(bench.initial), bench.adapter.model, s.personal_blocks, s.personal_keys)


def server(plan: ParadigmPlan, bench: Workbench, evaluate_adapter: EvaluateAdapter, weight_cap: WeightCap):
    s: PersonalisedConfig = plan.settings  # type: ignore[assignment]
    personal = _personal(plan, bench)
    filler = {k: bench.initial[k] for k in personal}

    def complete(params: Params) -> Params:
        return {**filler, **params}

    def evaluate(params: Params, r: int, *on: Any) -> dict[str, Any]:
        return evaluate_adapter(complete(params), r, *on)

    shared = {k: v for k, v in bench.initial.items() if k not in personal}
    inner = sharing.server(plan, replace(bench, initial=shared), evaluate, weight_cap)
    n_personal = sum(bench.initial[k].numel() for k in personal)
    n_shared = sum(t.numel() for t in shared.values())
    steps = s.steps_of(plan.training.local_steps)
    if personal:
        log.info(
            "personalised (%s): %d adapter tensors (%s values) stay on each client, %d (%s values) are shared%s",
            s.method,
            len(personal),
            f"{n_personal:,}",
            len(shared),
            f"{n_shared:,}",
            f"; the first {steps} local steps train the personal part alone" if s.method == "fedrep" else "",
        )
    else:
        what = (
            f"a personal adapter trained {steps} steps a round pulled toward the global one (λ {s.lam:g})"
            if s.method == "ditto"
            else f"a personal adapter pulled toward its local copy (λ {s.lam:g}), which moves η·λ = "
            f"{s.eta * s.lam:g} of the way toward it every {steps} steps and is sent"
        )
        log.info("personalised (%s): each client keeps %s", s.method, what)
    info = {"personal_method": s.method, "personal_values": n_personal, "shared_values": n_shared}
    return Personalised(inner, complete, info)


def client(plan: ParadigmPlan, bench: Workbench, data: dict[int, ClientData], eval_set: EvalSet | None = None):
    s: PersonalisedConfig = plan.settings  # type: ignore[assignment]
    personal_trainer = None
    if s.method == "ditto":  # v's own steps; its trainer never adds DP-SGD's noise (v is never sent)
        t = plan.training.model_copy(update={"local_steps": s.steps_of(plan.training.local_steps)})
        personal_trainer = LocalTrainer(t, plan.rounds, plan.seed, bench.tokenizer.pad_token_id, plan.progress)
    return sharing.client(
        plan,
        bench,
        data,
        eval_set,
        PersonalisedClient,
        settings=s,
        personal=_personal(plan, bench),
        personal_trainer=personal_trainer,
    )
