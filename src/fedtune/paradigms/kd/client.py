"""KD-FedLLM, client side: (distil the consensus,) train on private data, score the public slice.

With logits on the downlink a client keeps its own adapter between rounds (client state ``kd``)
and may run its own model (``kd.client_models``), as long as it shares the tokenizer; no weights
ever cross the wire. With the adapter on the downlink it starts each round from the global adapter.
Every random choice derives from (seed, round, client id).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from fedtune.adapters.adapter_model import AdapterModel
from fedtune.client.data import ClientData, EvalSettings
from fedtune.client.trainer import LocalTrainer
from fedtune.core import rng
from fedtune.core.types import ClientState, Params
from fedtune.evaluation.harness import EvalSet
from fedtune.paradigms.evaluation import EvalReply, EvalRequest, evaluate_on
from fedtune.paradigms.kd.distill import DistillSettings, distil, score_public
from fedtune.paradigms.kd.distributions import TopK, id_dtype
from fedtune.paradigms.kd.messages import LOGP, KDReply, KDRequest
from fedtune.paradigms.kd.public import PublicSet
from fedtune.wire.link import Link


@dataclass
class Member:
    """One model a client may run: the base model with its adapter, and the seeded initial adapter."""

    adapter: AdapterModel
    initial: Params


@dataclass(frozen=True)
class KDClientSettings:
    downlink: str  # "logits" | "adapter"
    top_k: int
    score_batch_size: int
    vocab: int
    seed: int


class KDClient:
    serves = (KDRequest, EvalRequest)

    def __init__(
        self,
        members: Callable[[str], Member],
        model_of: Callable[[int], str],
        tokenizer: PreTrainedTokenizerBase,
        data: dict[int, ClientData],
        trainer: LocalTrainer,
        public: PublicSet,
        settings: KDClientSettings,
        distill: DistillSettings,
        eval_settings: EvalSettings,
        uplink: Link,
        downlink: Link,
        eval_set: EvalSet | None = None,
    ):
        """``model_of(client id)`` names the model that client runs; ``members(name)`` gives it (built once,
        when a client that runs it is first served)."""
        self.members, self.model_of, self.tokenizer, self.data = members, model_of, tokenizer, data
        self.trainer, self.public, self.settings, self.distill = trainer, public, settings, distill
        self.eval_settings, self.uplink, self.downlink, self.eval_set = eval_settings, uplink, downlink, eval_set
        self._serve = {KDRequest: self.train, EvalRequest: self.evaluate}

    def serve(self, client_id: int, request, state: ClientState):
        return self._serve[type(request)](client_id, request, state)

    def _start(self, client_id: int, params_wire: Params, state: ClientState) -> AdapterModel:
        """Load what this round starts from: the global adapter, or the client's own."""
        member = self.members(self.model_of(client_id))
        if params_wire:
            member.adapter.load(self.downlink.decode(params_wire, member.adapter.params))
        else:
            member.adapter.load(state.get("kd") or member.initial)
        return member.adapter

    def train(self, client_id: int, req: KDRequest, state: ClientState) -> tuple[KDReply, ClientState]:
        s, pad = self.settings, self.tokenizer.pad_token_id
        if req.public_digest != self.public.digest:
            raise ValueError(
                f"the server's public set ({req.public_digest}) is not this client's ({self.public.digest}): "
                "every party needs the same data.public_dataset (or the same built-in data settings)"
            )
        start = time.perf_counter()
        adapter = self._start(client_id, req.params if s.downlink == "adapter" else {}, state)
        data = self.data[client_id]
        common = dict(round=req.round, num_examples=len(data.train))
        steps, distill_loss, flops, activations, fed = 0, None, 0.0, 0, 0
        if len(req.teach):
            teacher = self._teacher(req)
            result = distil(
                adapter,
                self.public,
                req.teach,
                teacher,
                self.distill,
                pad,
                rng.KD_DISTIL.key(s.seed, req.round, client_id),
            )
            if result.diverged:
                return self._diverged(common, f"distillation: {result.error}", time.perf_counter() - start), state
            steps, distill_loss = result.steps, result.mean_loss
            flops, activations, fed = result.flops, result.peak_activation_bytes, result.input_tokens
        out = self.trainer.train(adapter, client_id, req.round, data)
        if out.result.diverged:
            return self._diverged(common, out.result.error, time.perf_counter() - start), state
        self.public.check(req.score)
        top, scoring = score_public(adapter, self.public, req.score, s.top_k, s.score_batch_size, pad)  # (P, k)
        wire, _ = self.uplink.encode(
            {LOGP: top.logp}, {}, rng.torch_generator(rng.UPLINK, s.seed, req.round, client_id)
        )
        if s.downlink == "logits":
            state = {**state, "kd": adapter.get_state()}
        reply = KDReply(
            ids=top.ids.to(id_dtype(s.vocab)),
            logp=wire,
            steps=steps + out.result.steps,
            train_loss=out.result.mean_loss,
            distill_loss=distill_loss,
            local_train_s=time.perf_counter() - start,
            peak_bytes=self.trainer.held_bytes(adapter) + max(activations, out.result.peak_activation_bytes),
            flops=flops + out.result.flops + scoring,
            trained_tokens=fed + out.result.input_tokens,
            **common,
        )
        return reply, state

    def _teacher(self, req: KDRequest) -> TopK:
        """The consensus the server sent, checked against the public slice it belongs to."""
        self.public.check(req.teach)
        logp = self.downlink.decode(req.teacher_logp, [LOGP])[LOGP].float()
        ids = req.teacher_ids.long()
        rows = self.public.positions(req.teach)
        if ids.ndim != 2 or ids.shape[0] != rows or logp.shape != ids.shape:
            raise ValueError(f"teacher of shape {tuple(ids.shape)}/{tuple(logp.shape)} for {rows} public positions")
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= self.settings.vocab):
            raise ValueError("teacher token ids outside the vocabulary")
        return TopK(ids, logp)

    def _diverged(self, common: dict, error: str | None, elapsed: float) -> KDReply:
        empty = torch.zeros(0, self.settings.top_k, dtype=id_dtype(self.settings.vocab))
        return KDReply(
            ids=empty,
            steps=0,
            train_loss=math.nan,
            distill_loss=None,
            local_train_s=elapsed,
            status="diverged",
            error=error,
            **common,
        )

    def evaluate(self, client_id: int, req: EvalRequest, state: ClientState) -> tuple[EvalReply, ClientState]:
        data = self.data[client_id].holdout if req.split == "holdout" else self.eval_set
        if data is None:
            return EvalReply(round=req.round), state
        adapter = self._start(client_id, req.params, state)
        metrics = evaluate_on(adapter, self.tokenizer, data, self.eval_settings, req.round)
        return EvalReply(round=req.round, metrics=metrics), state
