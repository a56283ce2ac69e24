"""Parameter sharing, client side: load the global adapter, train on private data, send the update.

The client's persistent state has one namespace per owner: ``held`` (the adapter it holds, with
downlink updates), ``residual`` (the uplink's error-feedback residuals), ``scaffold`` (its
control variate c_i), ``secagg`` (a secure round's secrets, ``secure_client``), ``dp_sgd`` (the
secret seed of its DP-SGD noise) and ``forward`` (with forward-gradient training, the adapter its last
round started from: the global adapter's movement since then aligns its directions). Every random
choice derives from (seed, round, client id), so a resumed run replays exactly what an
uninterrupted one would have done.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from fedtune.adapters.adapter_model import AdapterModel
from fedtune.adapters.routed_lora import RoutedLoRA
from fedtune.client.corrections import FedProx, Scaffold, updated_client_control
from fedtune.client.data import ClientData, EvalSettings
from fedtune.client.trainer import LocalTrainer, TrainOutcome
from fedtune.core import rng
from fedtune.core.types import ClientState, Params
from fedtune.evaluation.harness import EvalSet
from fedtune.paradigms.evaluation import EvalReply, EvalRequest, evaluate_on
from fedtune.paradigms.parameter_sharing import secure_client as secure
from fedtune.paradigms.parameter_sharing.messages import TrainReply, TrainRequest
from fedtune.paradigms.parameter_sharing.secure_messages import MaskedInputRequest, ShareKeysRequest, UnmaskRequest
from fedtune.wire.link import Link, apply_change
from fedtune.wire.messages import Message


@dataclass(frozen=True)
class _Start:
    """A client's round before training: what it starts from and what shapes its training."""

    params: Params  # the adapter training starts from
    state: ClientState
    corrections: list
    c_i: Params | None  # SCAFFOLD's client control variate, when the round uses it
    noise_seed: int | None  # DP-SGD's


class ParameterSharingClient:
    serves = (TrainRequest, EvalRequest, ShareKeysRequest, MaskedInputRequest, UnmaskRequest)

    def __init__(
        self,
        adapter: AdapterModel,
        tokenizer: PreTrainedTokenizerBase,
        data: dict[int, ClientData],
        trainer: LocalTrainer,
        seed: int,
        eval_settings: EvalSettings,
        uplink: Link,
        downlink: Link,
        initial: Params,
        proximal_mu: float = 0.0,
        eval_set: EvalSet | None = None,
        noise_seed: int | None = None,
        routing: RoutedLoRA | None = None,
    ):
        """``uplink`` encodes each update; ``downlink`` decodes the global adapter as the server encoded
        it; ``initial`` is the seeded initial adapter, what every client holds before its first update;
        ``routing``: train the clients of ``serve_many`` jointly over these LoRA layers."""
        self.adapter, self.tokenizer, self.data, self.trainer = adapter, tokenizer, data, trainer
        self.seed, self.eval_settings, self.proximal_mu, self.eval_set = seed, eval_settings, proximal_mu, eval_set
        self.uplink, self.downlink, self.initial = uplink, downlink, initial
        self.noise_seed = noise_seed  # privacy.noise_seed: DP-SGD's noise repeats across runs (experiments only)
        self.routing = routing
        self._serve = {
            TrainRequest: self.train,
            EvalRequest: self.evaluate,
            ShareKeysRequest: lambda client_id, req, state: secure.share_keys(req, state),
            MaskedInputRequest: lambda client_id, req, state: secure.masked_input(req, state),
            UnmaskRequest: lambda client_id, req, state: secure.unmask(req, state),
        }

    def serve(self, client_id: int, request, state: ClientState):
        return self._serve[type(request)](client_id, request, state)

    def _receive(self, req: TrainRequest, state: ClientState) -> tuple[Params, ClientState]:
        """(the adapter to train from, client state): a full adapter, or a change to the one held."""
        if req.downlink == "full":
            params = self.downlink.decode(req.params, self.adapter.params)
            self.adapter.load(params)
            return params, state
        held = state.get("held") or self.initial
        params = apply_change(held, self.downlink.decode(req.params, sorted(self.adapter.params)))
        self.adapter.load(params)
        return params, {**state, "held": params}

    def train(self, client_id: int, req: TrainRequest, state: ClientState) -> tuple[TrainReply, ClientState]:
        start = self._start(client_id, req, state)
        corrections, seed, state = start.corrections, start.noise_seed, start.state
        reference = None
        if self.trainer.cfg.gradient == "forward":
            last = state.get("forward")  # the movement since is a descent step: its negative a gradient's direction
            reference = None if last is None else {k: last[k] - start.params[k] for k in start.params}
            start = replace(start, state={**state, "forward": start.params})
        out = self.trainer.train(
            self.adapter, client_id, req.round, self.data[client_id], corrections, noise_seed=seed, reference=reference
        )
        local = None if out.result.diverged else self.adapter.get_state()
        return self._finish(client_id, req, start, out, local)

    def serve_many(self, jobs: list[tuple[int, Any, ClientState]]) -> list[tuple[Message, ClientState]]:
        """Serve several clients' requests; train requests of one round train jointly when ``routing`` is set
        (one forward/backward a micro-batch, ``client.joint_training``), anything else in turn."""
        train = [j for j in jobs if type(j[1]) is TrainRequest]
        if self.routing is None or len(train) < 2 or len({j[1].round for j in train}) > 1:
            return [self.serve(*j) for j in jobs]
        starts = {cid: self._start(cid, req, state) for cid, req, state in train}
        tensors = {cid: self.routing.leaves(s.params) for cid, s in starts.items()}
        round_index = train[0][1].round
        group = [(cid, self.data[cid], tensors[cid], starts[cid].corrections) for cid, _, _ in train]
        trained = self.trainer.train_jointly(self.adapter, self.routing, round_index, group)
        outs = dict(zip(starts, trained, strict=True))
        served = {}
        for cid, req, _ in train:
            leaves = tensors[cid].items()
            local = None if outs[cid].result.diverged else {k: t.detach().to("cpu", copy=True) for k, t in leaves}
            served[cid] = self._finish(cid, req, starts[cid], outs[cid], local)
        return [served[cid] if type(req) is TrainRequest else self.serve(cid, req, state) for cid, req, state in jobs]

    def _start(self, client_id: int, req: TrainRequest, state: ClientState) -> _Start:
        """What a client's training starts from: the adapter (lossy if the downlink is), corrections, DP seed."""
        params, state = self._receive(req, state)
        live = self.adapter.params  # the tensors that train, where the model is: the corrections act beside them
        corrections: list = []
        if self.proximal_mu > 0:
            corrections.append(FedProx([params[k].to(p.device) for k, p in live.items()], self.proximal_mu))
        c_i = None
        if req.scaffold_c:  # c_i starts at zero the first time a client takes part
            own = state.get("scaffold", {})
            c_i = {k: own.get(k, torch.zeros_like(req.scaffold_c[k])) for k in live}
            on = {k: p.device for k, p in live.items()}
            corrections.append(
                Scaffold([req.scaffold_c[k].to(d) for k, d in on.items()], [c_i[k].to(d) for k, d in on.items()])
            )
        seed = None
        if self.trainer.dp_sgd is not None:
            seed, state = self._dp_sgd_seed(state)
        return _Start(params, state, corrections, c_i, seed)

    def _finish(
        self, client_id: int, req: TrainRequest, start: _Start, out: TrainOutcome, local: Params | None
    ) -> tuple[TrainReply, ClientState]:
        """The reply to a round's training that ended with the adapter ``local`` (None: it diverged)."""
        data, result, params, state = self.data[client_id], out.result, start.params, start.state
        common = dict(
            round=req.round,
            num_examples=len(data.train),
            num_tokens=data.num_tokens,
            steps=result.steps,
            train_loss=result.mean_loss,
            local_train_s=out.elapsed_s,
            peak_bytes=self.trainer.held_bytes(self.adapter) + result.peak_activation_bytes,
            flops=result.flops,
            trained_tokens=result.input_tokens,
        )
        if local is None:
            return TrainReply(delta={}, status="diverged", error=result.error, **common), state
        delta = {k: local[k] - params[k] for k in local}
        if req.secagg:  # the update leaves only masked, in the secure exchanges that follow
            keys, state = secure.prepare(delta, req.secagg, client_id, req.round, state)
            return TrainReply(delta={}, secagg_keys=keys, **common), state
        residual = state.get("residual", {})
        gen = rng.torch_generator(rng.UPLINK, self.seed, req.round, client_id)
        wire, residual = self.uplink.encode(delta, residual, gen)
        if residual:
            state = {**state, "residual": residual}
        if start.c_i is None:
            return TrainReply(delta=wire, **common), state
        new_c = updated_client_control(start.c_i, req.scaffold_c, params, local, result.lr_sum)
        delta_c = {k: new_c[k] - start.c_i[k] for k in local}
        return TrainReply(delta=wire, scaffold_delta_c=delta_c, **common), {**state, "scaffold": new_c}

    def _dp_sgd_seed(self, state: ClientState) -> tuple[int, ClientState]:
        """DP-SGD's noise seed: the client's own secret (owner ``dp_sgd``), drawn from the OS the first time."""
        if self.noise_seed is not None:
            return self.noise_seed, state
        own = state.get("dp_sgd", {})
        if "noise_seed" not in own:
            own = {"noise_seed": torch.tensor([secrets.randbits(63)], dtype=torch.int64)}
            state = {**state, "dp_sgd": own}
        return int(own["noise_seed"][0]), state

    def evaluate(self, client_id: int, req: EvalRequest, state: ClientState) -> tuple[EvalReply, ClientState]:
        data = self.data[client_id].holdout if req.split == "holdout" else self.eval_set
        if data is None:
            return EvalReply(round=req.round), state
        self.adapter.load(self.downlink.decode(req.params, self.adapter.params))
        return EvalReply(
            round=req.round, metrics=evaluate_on(self.adapter, self.tokenizer, data, self.eval_settings, req.round)
        ), state
