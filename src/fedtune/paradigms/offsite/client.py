"""Offsite-tuning, client side: build the emulator from what the server sends, then train as parameter sharing.

A client process starts with no model at all (``Capabilities.client_base`` is false: its workbench holds
the tokenizer only). The first emulator it is sent is checked (its digest, then every tensor's name,
shape and dtype against the emulator model its own config and the sandwich describe), built without any
other weights, and given the adapter on its adapter blocks (any method ``adapter.layers`` confines; the
tensors of methods that tune the emulator's own, blocks and bitfit, arrive as the adapter, not in the
emulator); from then on this process serves parameter sharing's requests over it. The emulator belongs
to the process, not to a client's state: a simulation worker serving many clients holds it once, and a
restarted process says it lacks it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from fedtune.adapters.adapter_model import AdapterModel
from fedtune.core.registry import trains_base
from fedtune.core.types import ClientState, Params
from fedtune.models.loading import load_config
from fedtune.paradigms.evaluation import EvalRequest
from fedtune.paradigms.offsite.emulator import config_blocks, digest, emulator_from, layer_drop
from fedtune.paradigms.offsite.messages import EmulatorReply, EmulatorRequest
from fedtune.paradigms.parameter_sharing.messages import TrainRequest
from fedtune.paradigms.parameter_sharing.secure_messages import MaskedInputRequest, ShareKeysRequest, UnmaskRequest
from fedtune.paradigms.plan import ParadigmPlan, Workbench

log = logging.getLogger("fedtune")


class OffsiteClient:
    serves = (EmulatorRequest, TrainRequest, EvalRequest, ShareKeysRequest, MaskedInputRequest, UnmaskRequest)

    def __init__(self, plan: ParadigmPlan, bench: Workbench, build_inner: Callable[[Workbench], Any]):
        """``build_inner(bench)``: parameter sharing's client over a workbench whose adapter is the emulator's."""
        self.plan, self.bench, self.build_inner = plan, bench, build_inner
        self.inner: Any = None
        self.digest: str | None = None
        self.own: dict[str, torch.nn.Parameter] = {}  # the frozen emulator's parameters by the plain model's names

    def serve(self, client_id: int, request: Any, state: ClientState) -> tuple[Any, ClientState]:
        if isinstance(request, EmulatorRequest):
            return self._emulator(request), state
        if self.inner is None:  # a restarted process, asked on by a server that saw the emulator held here
            log.warning("client %d: asked to %s with no emulator in this process", client_id, request.KIND)
            return EmulatorReply(request.round, "", "missing"), state
        return self.inner.serve(client_id, request, state)

    def _emulator(self, req: EmulatorRequest) -> EmulatorReply:
        if req.digest == self.digest:
            return EmulatorReply(req.round, req.digest, "held")
        if not req.weights or (req.base and req.base != self.digest):
            return EmulatorReply(req.round, req.digest, "missing", holds=self.digest or "")
        if req.base:  # the middle blocks alone, onto the emulator held
            self._update(req.weights, req.digest)
        else:
            if digest(req.weights) != req.digest:
                raise ValueError("the emulator arrived with other contents than its digest says; not built")
            adapter = self._adapter(req.weights, req.initial)
            self.inner = self.build_inner(replace(self.bench, adapter=adapter, initial=dict(req.initial)))
        self.digest = req.digest
        return EmulatorReply(req.round, req.digest, "held")

    def _update(self, part: Params, expected: str) -> None:
        """Copy ``part`` into the emulator held; its digest must then be ``expected`` (else it is dropped whole)."""
        for name, t in part.items():
            own = self.own.get(name)
            if own is None or own.shape != t.shape or own.dtype != t.dtype:
                raise ValueError(f"an emulator update names {name!r}, which the emulator holds otherwise or not")
        with torch.no_grad():
            for name, t in part.items():
                self.own[name].copy_(t)
        if digest({n: p.detach() for n, p in self.own.items()}) != expected:
            self.inner, self.digest, self.own = None, None, {}  # what it holds is no emulator the server sent
            raise ValueError("the emulator update does not give the emulator its digest names; dropped")

    def _adapter(self, weights: Params, initial: Params) -> AdapterModel:
        """The emulator built from ``weights`` alone, the plan's adapter on its adapter blocks set to ``initial``."""
        m, s = self.plan.model, self.plan.settings
        config = load_config(m.name, m.revision, m.trust_remote_code, m.gguf_file)
        sandwich = layer_drop(config_blocks(config), s.bottom, s.top, s.drop_ratio)  # type: ignore[attr-defined]
        a = self.plan.adapter
        # an adapter of the emulator's own tensors (method blocks, bitfit) completes it, as a copy: it trains
        in_base = {k: v.clone() for k, v in initial.items() if k not in weights} if trains_base(a.method) else {}
        model = emulator_from(config, sandwich, {**weights, **in_base}, getattr(torch, m.dtype))
        self.own = {n: p for n, p in model.named_parameters() if n in weights}  # before the tuner wraps it
        adapter = AdapterModel(model, a, a.init_seed if a.init_seed is not None else self.plan.seed)
        adapter.set_state(initial)  # ValueError unless it fits the emulator's adapter blocks exactly
        log.info(
            "emulator built: %s; %s parameters", sandwich.describe(), f"{sum(t.numel() for t in weights.values()):,}"
        )
        return adapter
