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

import torch

from fedtune.adapters.adapter_model import AdapterModel
from fedtune.aggregation.weighting import WeightCap
from fedtune.client.data import ClientData
from fedtune.core.errors import ConfigError
from fedtune.core.types import Params
from fedtune.data.prepare import public_examples
from fedtune.data.tokenize import collate
from fedtune.evaluation.harness import EvalSet
from fedtune.models.blocks import causal_lm
from fedtune.models.loading import cache_dir
from fedtune.paradigms.offsite.client import OffsiteClient
from fedtune.paradigms.offsite.distill import DistillSettings, cached_distil
from fedtune.paradigms.offsite.emulator import build_emulator, from_full, layer_drop, num_blocks, to_full
from fedtune.paradigms.offsite.host import Host, Realignment
from fedtune.paradigms.offsite.prune import prune, taylor_importance
from fedtune.paradigms.offsite.server import Offsite
from fedtune.paradigms.offsite.settings import OffsiteConfig
from fedtune.paradigms.parameter_sharing import setup as sharing
from fedtune.paradigms.plan import ParadigmPlan, Workbench

if TYPE_CHECKING:
    from fedtune.paradigms.base import EvaluateAdapter

log = logging.getLogger("fedtune")


def server(plan: ParadigmPlan, bench: Workbench, evaluate_adapter: EvaluateAdapter, weight_cap: WeightCap) -> Offsite:
    s: OffsiteConfig = plan.settings  # type: ignore[assignment]
    full = bench.adapter
    assert full is not None  # the server holds the full model
    lm = causal_lm(full.model)
    sandwich = layer_drop(num_blocks(lm), s.bottom, s.top, s.drop_ratio)
    # the emulator shares the full model's tensors unless something trains its middle
    emulator = build_emulator(lm, sandwich, share=not s.trains_middle(), state=full.base_params)
    info: dict[str, Any] = {"emulator": sandwich.describe(), "emulator_blocks": list(sandwich.blocks)}
    batches = _public_batches(plan, bench, s) if s.uses_public() else []
    if s.prune.on():
        middle = range(sandwich.bottom, sandwich.bottom + len(sandwich.kept))
        scores = taylor_importance(emulator, middle, batches[: s.prune.batches])
        kept = prune(emulator, middle, scores, s.prune.mlp_keep, s.prune.heads_keep)
        log.info("offsite: the middle pruned to %s", ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in kept.items()))
        info |= {f"pruned_{k}": v for k, v in kept.items()}
    if s.emulator == "distil":
        d = s.distil
        settings = DistillSettings.of(d, 0)  # the owner's one emulator, whatever the run's seed
        losses, cached = cached_distil(
            emulator, lm, full.base_params, sandwich, batches, settings, cache_dir() / "offsite", plan.progress
        )
        log.info(
            "offsite: emulator distilled %d steps on the public set (loss %.4f -> %.4f)%s",
            d.steps,
            losses[0],
            losses[-1],
            ", from the cache" if cached else "",
        )
        info |= {"distil_loss_first": losses[0], "distil_loss_last": losses[-1], "distil_cached": cached}
    own = dict(emulator.named_parameters())  # by the plain model's names, before the tuner wraps it
    a = plan.adapter
    emu = AdapterModel(emulator, a, a.init_seed if a.init_seed is not None else plan.seed)
    initial = from_full(bench.initial, lm, sandwich)
    try:
        emu.set_state(initial)
    except ValueError as exc:
        raise ConfigError(
            f"the adapter on the full model's adapter blocks does not fit the emulator's: {exc}"
        ) from None
    n_full = sum(p.numel() for p in {id(p): p for p in full.base_params.values()}.values())  # the base, tied once
    n_emu = sum(t.numel() for t in own.values())
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

    r = s.realign
    realignment = Realignment(DistillSettings.of(r, plan.seed), batches, full, plug_in)
    host = Host(emu, own, sandwich, initial, realignment if r.steps > 0 else None, plan.progress)
    inner = sharing.server(plan, replace(bench, adapter=emu, initial=initial), evaluate, weight_cap)
    info |= {"emulator_params": n_emu, "full_params": n_full, "emulator_kind": s.emulator, "realign_steps": r.steps}
    return Offsite(inner, host, plug_in, info)


def _public_batches(plan: ParadigmPlan, bench: Workbench, s: OffsiteConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The public set as (input_ids, attention_mask) batches, each (B, T): whole conversations, in order."""
    examples, source = public_examples(plan.data, "paradigm offsite (emulator distil, or realign)")
    encoded, _ = bench.encoder.encode_all(examples)
    size = s.distil.batch_size if s.emulator == "distil" else s.realign.batch_size
    pad = bench.tokenizer.pad_token_id
    batches = [collate(encoded[i : i + size], pad) for i in range(0, len(encoded), size)]
    log.info("offsite: public set of %d examples from %s", len(encoded), source)
    return [(b["input_ids"], b["attention_mask"]) for b in batches]


def client(plan: ParadigmPlan, bench: Workbench, data: dict[int, ClientData], eval_set: EvalSet | None = None):
    return OffsiteClient(plan, bench, lambda emulated: sharing.client(plan, emulated, data, eval_set))
