"""Personalised FL, client side: parameter sharing's client, with a personal adapter kept in its state.

The client state's ``personal`` namespace holds what never leaves the client: the personal part of a split
adapter (FedPer, FedRep), the personal adapter v (Ditto) or θ (pFedMe). Training and the reply are parameter
sharing's; what is trained and what is sent differ by method:

- fedper: the shared part (from the server) and the personal part (own) train together; the shared part's
  change is sent;
- fedrep: the same, the first ``personal_steps`` steps training the personal part alone, the rest the shared;
- ditto: the global adapter trains as in FedAvg and its change is sent; then v trains for ``personal_steps``
  steps on loss + λ/2·‖v − w‖², w the global adapter the round started from;
- pfedme: θ trains from w on loss + λ/2·‖θ − w_i‖², its local copy w_i moving toward it every
  ``personal_steps`` steps (``parts.LocalCopy``); w_i's change is sent and θ kept.
"""

from __future__ import annotations

from dataclasses import replace

from fedtune.client.corrections import FedProx
from fedtune.client.trainer import LocalTrainer
from fedtune.core.types import ClientState, Params
from fedtune.paradigms.evaluation import EvalReply, EvalRequest, evaluate_on
from fedtune.paradigms.parameter_sharing.client import ParameterSharingClient
from fedtune.paradigms.parameter_sharing.messages import TrainReply, TrainRequest
from fedtune.paradigms.personalised.messages import PersonalEvalRequest
from fedtune.paradigms.personalised.parts import Freeze, LocalCopy
from fedtune.paradigms.personalised.settings import PersonalisedConfig
from fedtune.wire.link import apply_change

OWNER = "personal"


class PersonalisedClient(ParameterSharingClient):
    serves = (*ParameterSharingClient.serves, PersonalEvalRequest)

    def __init__(
        self,
        *args,
        settings: PersonalisedConfig,
        personal: frozenset[str],
        personal_trainer: LocalTrainer | None = None,
        **kwargs,
    ):
        """Parameter sharing's client's arguments, and: ``personal``, the names of the personal part (FedPer,
        FedRep; empty otherwise); ``personal_trainer``: Ditto's trainer of v (its local steps are v's)."""
        super().__init__(*args, **kwargs)
        self.settings, self.personal, self.personal_trainer = settings, personal, personal_trainer
        self.shared = sorted(k for k in self.adapter.params if k not in personal)
        self._serve[PersonalEvalRequest] = self.evaluate_personal

    # ---- what the server sends, and the adapter a client trains or evaluates

    def _sent(self, wire: Params, state: ClientState, change: bool = False) -> tuple[Params, ClientState]:
        """The shared tensors the server sent (all of them unless the adapter is split), and the state (with a
        downlink change, the shared tensors held)."""
        live = self.adapter.params
        if not change:
            return self.downlink.decode(wire, {k: live[k] for k in self.shared}), state
        held = state.get("held") or {k: self.initial[k] for k in self.shared}
        shared = apply_change(held, self.downlink.decode(wire, self.shared))
        return shared, {**state, "held": shared}

    def _own(self, state: ClientState) -> Params:
        """The personal tensors this client holds ({} before it first trained, where the method keeps none)."""
        own = state.get(OWNER, {})
        if self.personal:  # the split's personal part starts where every client's adapter starts
            return {k: own.get(k, self.initial[k]) for k in self.personal}
        return dict(own)

    def _receive(self, req: TrainRequest, state: ClientState) -> tuple[Params, ClientState]:
        shared, state = self._sent(req.params, state, change=req.downlink != "full")
        params = {**shared, **self._own(state)} if self.personal else shared
        self.adapter.load(params)
        return params, state

    # ---- training

    def train(self, client_id: int, req: TrainRequest, state: ClientState) -> tuple[TrainReply, ClientState]:
        if self.settings.method == "ditto":
            return self._ditto(client_id, req, state)
        start = self._start(client_id, req, state)
        corrections = list(start.corrections)
        live = self.adapter.params
        local_copy = None
        if self.settings.method == "fedrep":  # Freeze last: it drops the gradients the others may have added to
            switch = self.settings.steps_of(self.trainer.cfg.local_steps)
            corrections.append(Freeze([k in self.personal for k in live], switch))
        elif self.settings.method == "pfedme":
            s = self.settings
            local_copy = LocalCopy([p.detach() for p in live.values()], s.lam, s.eta, s.steps_of(None))
            corrections.append(local_copy)
        data = self.data[client_id]
        out = self.trainer.train(self.adapter, client_id, req.round, data, corrections, noise_seed=start.noise_seed)
        if out.result.diverged:
            return self._finish(client_id, req, start, out, None)
        trained = self.adapter.get_state()
        if local_copy is not None:  # the local copy is sent, the personal adapter θ kept
            sent = {k: w.to("cpu", copy=True) for k, w in zip(live, local_copy.local, strict=True)}
            mine = trained
        else:
            sent = {k: trained[k] for k in self.shared}
            mine = {k: trained[k] for k in self.personal}
        reply, state = self._finish(client_id, req, start, out, sent)
        return reply, {**state, OWNER: mine}

    def _ditto(self, client_id: int, req: TrainRequest, state: ClientState) -> tuple[TrainReply, ClientState]:
        """FedAvg's round on the global adapter, then the personal adapter v's steps pulled toward it."""
        reply, state = super().train(client_id, req, state)
        if reply.status != "ok" or self.personal_trainer is None:
            return reply, state
        start = self._sent(req.params, state)[0] if req.downlink == "full" else state["held"]  # the round's w
        v = state.get(OWNER) or start
        self.adapter.load(v)
        live = self.adapter.params
        pull = FedProx([start[k].to(p.device) for k, p in live.items()], self.settings.lam)
        out = self.personal_trainer.train(self.adapter, client_id, req.round, self.data[client_id], [pull])
        if not out.result.diverged:  # a diverged personal round keeps v as it was
            state = {**state, OWNER: self.adapter.get_state()}
        return replace(
            reply,
            local_train_s=reply.local_train_s + out.elapsed_s,
            flops=reply.flops + out.result.flops,
            trained_tokens=reply.trained_tokens + out.result.input_tokens,
        ), state

    # ---- evaluation on the client's own held-out share

    def evaluate(self, client_id: int, req: EvalRequest, state: ClientState) -> tuple[EvalReply, ClientState]:
        """The global model: what the server shares, with the split's personal part as every client starts it."""
        shared, _ = self._sent(req.params, state)
        filler = {k: self.initial[k] for k in self.personal}
        return self._evaluate(client_id, req.round, {**filler, **shared}, req.split), state

    def evaluate_personal(
        self, client_id: int, req: PersonalEvalRequest, state: ClientState
    ) -> tuple[EvalReply, ClientState]:
        """The personalised model: what the server shares, with this client's personal tensors in their place."""
        shared, _ = self._sent(req.params, state)
        return self._evaluate(client_id, req.round, {**shared, **self._own(state)}, "holdout"), state

    def _evaluate(self, client_id: int, r: int, params: Params, split: str) -> EvalReply:
        data = self.data[client_id].holdout if split == "holdout" else self.eval_set
        if data is None:
            return EvalReply(round=r)
        self.adapter.load(params)
        return EvalReply(round=r, metrics=evaluate_on(self.adapter, self.tokenizer, data, self.eval_settings, r))
