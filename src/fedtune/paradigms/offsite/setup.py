"""Offsite-tuning from a plan: the emulator and parameter sharing over it on the server; the emulator's client.

The server builds the emulator from its full model (uniform layer drop of the middle, distilled when
``paradigm.emulator`` is distil), puts the run's initial adapter on it (the full model's adapter blocks,
renamed), and evaluates every global adapter twice: plugged into the full model (the federation's
model: ``eval_loss`` and the rest) and on the emulator (``emulator_eval_loss``); ``emulator_gap`` is
the emulator's loss minus the plug-in's (what the owner's protection looks like, Offsite-Tuning §3).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from fedtune.adapters.adapter_model import AdapterModel
from fedtune.aggregation.weighting import WeightCap
from fedtune.client.data import ClientData
from fedtune.core.errors import ConfigError
from fedtune.core.types import Params
from fedtune.evaluation.harness import EvalSet
from fedtune.models.blocks import causal_lm
from fedtune.paradigms.offsite.client import OffsiteClient
from fedtune.paradigms.offsite.emulator import (
    build_emulator,
    digest,
    from_full,
    layer_drop,
    num_blocks,
    to_full,
    weights,
)
from fedtune.paradigms.offsite.server import Emulator, Offsite
from fedtune.paradigms.parameter_sharing import setup as sharing
from fedtune.paradigms.plan import ParadigmPlan, Workbench

if TYPE_CHECKING:
    from fedtune.paradigms.base import EvaluateAdapter

log = logging.getLogger("fedtune")


def server(plan: ParadigmPlan, bench: Workbench, evaluate_adapter: EvaluateAdapter, weight_cap: WeightCap) -> Offsite:
    s = plan.settings
    full = bench.adapter
    assert full is not None  # the server holds the full model
    lm = causal_lm(full.model)
    sandwich = layer_drop(num_blocks(lm), s.bottom, s.top, s.drop_ratio)  # type: ignore[attr-defined]
    emulator = build_emulator(lm, sandwich, share=True, state=full.base_params)
    sent = weights(emulator)
    a = plan.adapter
    emu = AdapterModel(emulator, a, a.init_seed if a.init_seed is not None else plan.seed)
    initial = from_full(bench.initial, lm, sandwich)
    try:
        emu.set_state(initial)
    except ValueError as exc:
        raise ConfigError(
            f"the adapter on the full model's adapter blocks does not fit the emulator's: {exc}"
        ) from None
    n_full = sum(p.numel() for p in lm.parameters())
    n_emu = sum(t.numel() for t in sent.values())
    log.info(
        "offsite: emulator of %d of %d blocks (%s), %s of %s parameters (%.1f%%), sent once to each client process",
        len(sandwich.blocks),
        sandwich.layers,
        sandwich.describe(),
        f"{n_emu:,}",
        f"{n_full:,}",
        100 * n_emu / n_full,
    )

    def plug_in(params: Params) -> Params:
        return to_full(params, emulator, sandwich)

    def evaluate(params: Params, r: int, on: Any = None) -> dict[str, Any]:
        out = evaluate_adapter(plug_in(params), r)
        mine = evaluate_adapter(params, r, emu)
        out.update({f"emulator_{k}": v for k, v in mine.items() if isinstance(v, int | float) and k.startswith("eval")})
        if "eval_loss" in out and "eval_loss" in mine:
            out["emulator_gap"] = mine["eval_loss"] - out["eval_loss"]
        return out

    inner = sharing.server(plan, replace(bench, adapter=emu, initial=initial), evaluate, weight_cap)
    info = {
        "emulator": sandwich.describe(),
        "emulator_blocks": list(sandwich.blocks),
        "emulator_params": n_emu,
        "full_params": n_full,
        "emulator_kind": s.emulator,  # type: ignore[attr-defined]
    }
    return Offsite(inner, Emulator(sent, digest(sent), initial), plug_in, info)


def client(plan: ParadigmPlan, bench: Workbench, data: dict[int, ClientData], eval_set: EvalSet | None = None):
    return OffsiteClient(plan, bench, lambda emulated: sharing.client(plan, emulated, data, eval_set))
