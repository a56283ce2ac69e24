"""Split learning, client side: the client's part of the model, one exchange at a time.

A client's round so far lives in its state under the owner ``split`` (its part's tensors, their
gradients since the last optimizer step, the optimizer's state, the tensors it started from), so the
state can travel with each message (Ray) or stay with a deployed client, and any process can serve
the next exchange. The process that served the last one also keeps the round live in memory
(``_Live``: the part's tensors, its optimizer and the graph of each front still awaiting its
gradient), marked by a token saved in the state: when the next exchange brings that token, the
client goes on from memory and backpropagates through the kept graph. Otherwise (another process, a
restart, a round replayed) it loads the state and runs the front again on the same micro-batch with
the same tensors and random state, which gives the same graph and the same numbers. At most
``LIVE_SESSIONS`` clients' rounds are kept per process, each at most two fronts' activations.
"""

from __future__ import annotations

import math
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from fedtune.adapters.split import SplitModel
from fedtune.client.cost import (
    TRAINING,
    ActivationMeter,
    FlopModel,
    parameter_bytes,
    scored_positions,
    training_state_bytes,
)
from fedtune.client.data import ClientData
from fedtune.client.local_training import make_optimizer, optimizer_step
from fedtune.client.trainer import round_plan
from fedtune.config import TrainingConfig
from fedtune.core.rng import SPLIT_BACK_GRAD, SPLIT_FRONT, UPLINK, torch_generator
from fedtune.core.types import ClientState, Params
from fedtune.data.tokenize import IGNORE, collate
from fedtune.paradigms.evaluation import EvalReply, EvalRequest
from fedtune.paradigms.split.messages import EMPTY, Activations, Back, BackReply, Done, Forward
from fedtune.paradigms.split.steps import StepPlan, sq_norm
from fedtune.wire.link import Link

OWNER = "split"
LIVE_SESSIONS = 8  # clients whose round in progress one process keeps in memory (the least recent goes)


@dataclass
class _Live:
    """One client's round in progress, kept in memory between its exchanges."""

    token: int  # as saved in its state under "live": the state this session is
    params: dict[str, torch.Tensor]  # the part's tensors (leaves, with the gradients accumulated this step)
    opt: torch.optim.Optimizer
    fronts: dict[int, torch.Tensor] = field(default_factory=dict)  # micro-batch -> its front's output, graph kept


@dataclass(frozen=True)
class SplitClientSettings:
    training: TrainingConfig
    rounds: int
    seed: int
    pad_id: int
    max_micro_batches: int


def _front_rng(t: int) -> str:
    """Where the random state micro-batch ``t``'s front started from is kept until its gradient comes:
    at most two fronts await theirs (with ``u``, micro-batch t's while t + 1's is computed)."""
    return f"rng_front{t % 2}"


def relative_error(sent: torch.Tensor, received: torch.Tensor) -> float:
    """‖received − sent‖ / ‖sent‖ of a tensor through a codec chain (0 without loss)."""
    scale = float(torch.linalg.vector_norm(sent.float()))
    return float(torch.linalg.vector_norm(received.float() - sent.float())) / scale if scale > 0 else 0.0


class SplitClient:
    serves = (Forward, Back, EvalRequest)
    keep_live = True  # keep rounds in progress in memory between exchanges (False: from the state every time)

    def __init__(
        self,
        split: SplitModel,
        names: dict[str, str],
        like: Params,
        data: dict[int, ClientData],
        settings: SplitClientSettings,
        uplink: Link,
        downlink: Link,
        activations: Link,
    ):
        """``names``: the client part's adapter tensor names -> full parameter names in the model; ``like``:
        the part's tensors as this client's model holds them (what a received part must look like)."""
        self.split, self.names, self.like, self.data, self.s = split, names, like, data, settings
        self.uplink, self.downlink, self.activations = uplink, downlink, activations
        self.meter = ActivationMeter(split.model.parameters())
        self.live: OrderedDict[int, _Live] = OrderedDict()  # client id -> its round in memory, least recent first
        # its part of the model, and the gradient and optimizer state of the part's adapter tensors
        self.part_bytes = parameter_bytes(split.client_parameters()) + training_state_bytes(
            like.values(), settings.training.optimizer
        )
        lm = split.lm
        self.cost = FlopModel.of(
            split.blocks, int(lm.config.hidden_size), int(lm.get_output_embeddings().weight.shape[0])
        )

    def serve(self, client_id: int, request, state: ClientState):
        if isinstance(request, Forward):
            return self.forward(client_id, request, state)
        if isinstance(request, Back):
            return self.back(client_id, request, state)
        return EvalReply(round=request.round), state  # the client's part alone cannot evaluate

    # ---- one round, as kept in the state

    def _plan(self, client_id: int, r: int) -> tuple[int, list, StepPlan]:
        data = self.data[client_id]
        seed, batches = round_plan(self.s.seed, r, client_id, len(data.train), self.s.training)
        return seed, batches, StepPlan.of(self.s.training, self.s.rounds, r, len(data.train), self.s.max_micro_batches)

    def _batch(self, client_id: int, indices) -> dict[str, torch.Tensor]:
        return collate([self.data[client_id].train[i] for i in indices], self.s.pad_id)

    def _step_tokens(self, client_id: int, batches: list, plan: StepPlan, t: int) -> int:
        """Target positions of micro-batch ``t``'s optimizer step: the divisor of each of its losses."""
        return sum(int((self._batch(client_id, batches[i])["labels"][:, 1:] != IGNORE).sum()) for i in plan.group(t))

    def _load(self, own: Params) -> tuple[dict[str, torch.Tensor], torch.optim.Optimizer]:
        """The part's tensors (leaves with their accumulated gradients) and its optimizer, from the state."""
        params = {k: own[f"p/{k}"].clone().requires_grad_(True) for k in self.names}
        for k, p in params.items():
            grad = own.get(f"g/{k}")
            p.grad = grad.clone() if grad is not None else None
        t = self.s.training
        opt = make_optimizer(t.optimizer, list(params.values()), t.lr, t.weight_decay)
        saved = {}
        for i, k in enumerate(self.names):
            entries = {key.split("/")[2]: v for key, v in own.items() if key.startswith(f"opt/{k}/")}
            if entries:
                saved[i] = {n: v.clone() for n, v in entries.items()}
        if saved:
            opt.load_state_dict({"state": saved, "param_groups": opt.state_dict()["param_groups"]})
        return params, opt

    def _save(self, own: Params, session: _Live, **extra) -> Params:
        out = {k: v for k, v in own.items() if not k.startswith(("p/", "g/", "opt/"))}
        params, opt = session.params, session.opt
        for k in self.names:
            p = params[k]
            out[f"p/{k}"] = p.detach().clone()
            if p.grad is not None:
                out[f"g/{k}"] = p.grad.detach().clone()
            for n, v in opt.state.get(p, {}).items():
                out[f"opt/{k}/{n}"] = v.detach().clone() if torch.is_tensor(v) else torch.tensor(v)
        out.update(extra)
        return out

    def _session(self, client_id: int, own: Params) -> _Live:
        """The client's round in memory if ``own`` is the state it left, else one loaded from ``own``; either way
        out of the kept sessions until ``_keep`` puts it back."""
        live = self.live.pop(client_id, None)
        token = own.get("live")
        if live is not None and token is not None and int(token) == live.token:
            return live
        params, opt = self._load(own)
        return _Live(0, params, opt)

    def _keep(self, client_id: int, own: Params, session: _Live) -> None:
        """Keep ``session`` in memory as the round ``own`` (the state just saved) is; its token goes in both."""
        if not self.keep_live:
            return
        session.token = int.from_bytes(os.urandom(7), "big")
        own["live"] = torch.tensor(session.token, dtype=torch.int64)
        self.live[client_id] = session
        while len(self.live) > LIVE_SESSIONS:
            self.live.popitem(last=False)

    def _full(self, params: dict[str, torch.Tensor]) -> Params:
        return {self.names[k]: v for k, v in params.items()}

    def forward(self, client_id: int, req: Forward, state: ClientState) -> tuple[Activations | Done, ClientState]:
        start = time.perf_counter()
        t = req.step
        seed, batches, plan = self._plan(client_id, req.round)
        if t == 0:
            received = self.downlink.decode(req.params, self.like)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)  # dropout and any other torch randomness of this round
                rng = torch.random.get_rng_state()
            own: Params = {f"start/{k}": v.detach().clone() for k, v in received.items()}
            own.update({f"p/{k}": v.detach().clone() for k, v in received.items()})
            own["rng"] = rng
            own["meta"] = torch.zeros(3, dtype=torch.float64)  # [client seconds, FLOPs, peak activation bytes]
        else:
            own = self._own(state, req.round, t)
        session = self._session(client_id, own)
        client_sq = None
        meta = own["meta"].clone()
        if t > 0:
            client_sq = self._finish(client_id, own, session, batches, plan, t - 1, req.grad, req.server_sq_norm, meta)
        if t == plan.count:  # the round ends: its session, taken out by _session, is not kept again
            meta[0] += time.perf_counter() - start
            return self._done(client_id, req, own, session.params, meta, plan, client_sq), {
                k: v for k, v in state.items() if k != OWNER
            }
        wire, error, batch, rng = self._front(client_id, own["rng"], session, batches[t], req.round, t, meta)
        data = self.data[client_id]
        meta[0] += time.perf_counter() - start
        own = self._save(own, session, rng=rng, meta=meta, **{_front_rng(t): own["rng"]})
        self._keep(client_id, own, session)
        reply = Activations(
            round=req.round,
            step=t,
            hidden=wire,
            attention_mask=batch["attention_mask"].to(torch.uint8),
            labels=batch["labels"] if self.split.cut.shape == "vanilla" else EMPTY,
            step_tokens=self._step_tokens(client_id, batches, plan, t),
            num_examples=len(data.train) if t == 0 else 0,
            num_tokens=data.num_tokens if t == 0 else 0,
            client_sq_norm=client_sq,
            codec_error=error,
        )
        return reply, {**state, OWNER: own}

    def back(self, client_id: int, req: Back, state: ClientState) -> tuple[BackReply, ClientState]:
        """Shape u: the client's last blocks, head and loss on micro-batch ``req.step``; dL/dh at the cut.
        Within an optimizer step it also finishes micro-batch ``step - 1``'s front with the gradient the
        request carries, and runs micro-batch ``step + 1``'s front for the reply."""
        start = time.perf_counter()
        t = req.step
        own = self._own(state, req.round, t)
        _, batches, plan = self._plan(client_id, req.round)
        if not 0 <= t < plan.count:
            raise ValueError(f"round {req.round}: no micro-batch {t} (this round has {plan.count})")
        session = self._session(client_id, own)
        params = session.params
        meta = own["meta"].clone()
        if req.grad:
            if t == 0 or plan.ends_step(t - 1):
                raise ValueError(f"round {req.round}: micro-batch {t - 1}'s gradient may not come with Back({t})")
            self._finish(client_id, own, session, batches, plan, t - 1, req.grad, None, meta)
        batch = self._batch(client_id, batches[t])
        n_tokens = self._step_tokens(client_id, batches, plan, t)
        b, n = batch["input_ids"].shape
        like = torch.empty(b, n, self.split.lm.config.hidden_size, device="meta")
        received = self.activations.decode(req.hidden, {"h": like})["h"]
        if received.shape != like.shape:
            raise ValueError(f"hidden states of shape {tuple(received.shape)}, expected {tuple(like.shape)}")
        hidden = received.detach().requires_grad_(True)
        layers = self.split.layers
        self.meter.peak = 0
        with torch.random.fork_rng(devices=[]), self.meter.measure():
            torch.random.set_rng_state(own["rng"])
            loss_sum, positions = self.split.back_loss(
                self._full(params), hidden, batch["attention_mask"], batch["labels"], layers - self.split.cut.back
            )
            rng = torch.random.get_rng_state()
        _, back = self.split.client_blocks()
        value = float(loss_sum.detach())
        if math.isfinite(value):
            (loss_sum / max(1, n_tokens)).backward()
            grad = hidden.grad
        else:
            grad = torch.zeros_like(hidden)
        gen = torch_generator(SPLIT_BACK_GRAD, self.s.seed, req.round, client_id, t)
        wire = self.activations.encode({"h": grad}, {}, gen)[0]
        error = relative_error(grad, self.activations.decode(wire, {"h": grad})["h"])
        meta[1] += TRAINING * self.cost.forward(back, b, n, scored_positions(batch["labels"]))
        meta[2] = max(float(meta[2]), self.meter.peak)
        carried: dict = {}
        saved = {"rng": rng}
        if t + 1 < plan.count and not plan.ends_step(t):  # the next micro-batch's front: same step, same weights
            next_wire, next_error, next_batch, after = self._front(
                client_id, rng, session, batches[t + 1], req.round, t + 1, meta
            )
            carried = dict(next_hidden=next_wire, next_mask=next_batch["attention_mask"].to(torch.uint8))
            carried["next_codec_error"] = next_error
            saved = {"rng": after, _front_rng(t + 1): rng}
        meta[0] += time.perf_counter() - start
        own = self._save(own, session, meta=meta, **saved)
        self._keep(client_id, own, session)
        reply = BackReply(req.round, t, wire, value, positions, error, **carried)
        return reply, {**state, OWNER: own}

    # ---- the front: its forward for the server, and its backward when the gradient comes back

    def _own(self, state: ClientState, r: int, t: int) -> Params:
        own = dict(state.get(OWNER, {}))
        if not own:
            raise ValueError(f"round {r} step {t}: this client has no split round in progress")
        return own

    def _front(
        self, client_id: int, rng: torch.Tensor, session: _Live, indices, r: int, t: int, meta: torch.Tensor
    ) -> tuple[Params, float, dict[str, torch.Tensor], torch.Tensor]:
        """Micro-batch ``t``'s front from random state ``rng``, its graph kept in ``session`` while sessions are
        kept: (wire form of the hidden states, their relative error through the codecs, the batch, the random
        state after)."""
        batch = self._batch(client_id, indices)
        keep = self.keep_live
        if keep:
            self.meter.peak = 0
        with (
            torch.random.fork_rng(devices=[]),
            self.meter.measure() if keep else torch.no_grad(),
        ):
            torch.random.set_rng_state(rng)
            hidden = self.split.front(self._full(session.params), batch["input_ids"], batch["attention_mask"])
            after = torch.random.get_rng_state()
        b, n = batch["input_ids"].shape
        meta[1] += self.cost.forward(self.split.client_blocks()[0], b, n)  # the first forward
        if keep:
            session.fronts[t] = hidden
            meta[2] = max(float(meta[2]), self.meter.peak)
        hidden = hidden.detach()
        wire = self.activations.encode({"h": hidden}, {}, torch_generator(SPLIT_FRONT, self.s.seed, r, client_id, t))[0]
        return wire, relative_error(hidden, self.activations.decode(wire, {"h": hidden})["h"]), batch, after

    def _finish(
        self,
        client_id: int,
        own: Params,
        session: _Live,
        batches: list,
        plan: StepPlan,
        t: int,
        grad_wire: Params,
        server_sq: float | None,
        meta: torch.Tensor,
    ) -> float | None:
        """Micro-batch ``t``'s backward with the cut's gradient, through its kept graph or its front run again;
        at the end of its optimizer step, global clipping and the step. Returns ‖client grads‖² when a step
        was taken."""
        params = session.params
        batch = self._batch(client_id, batches[t])
        b, n = batch["input_ids"].shape
        forward = self.cost.forward(self.split.client_blocks()[0], b, n)
        hidden = session.fronts.pop(t, None)
        if hidden is None:
            self.meter.peak = 0
            with torch.random.fork_rng(devices=[]), self.meter.measure():
                torch.random.set_rng_state(own[_front_rng(t)])
                hidden = self.split.front(self._full(params), batch["input_ids"], batch["attention_mask"])
            meta[1] += TRAINING * forward  # forward again + backward
            meta[2] = max(float(meta[2]), self.meter.peak)
        else:
            meta[1] += (TRAINING - 1) * forward  # backward: its forward was counted when it ran
        grad = self.activations.decode(grad_wire, {"h": hidden})["h"]
        if grad.shape != hidden.shape:
            raise ValueError(f"the gradient at the cut is {tuple(grad.shape)}, not {tuple(hidden.shape)}")
        hidden.backward(grad.to(hidden.dtype))
        if not plan.ends_step(t):
            return None
        client_sq = sq_norm(params.values())
        tensors = list(params.values())
        opt = session.opt
        optimizer_step(opt, tensors, plan.lr(t), (), self.s.training.max_grad_norm, client_sq + float(server_sq or 0.0))
        return client_sq

    def _done(
        self, client_id: int, req: Forward, own: Params, params: dict, meta: torch.Tensor, plan: StepPlan, sq
    ) -> Done:
        local = {k: p.detach() for k, p in params.items()}
        delta = {k: local[k] - own[f"start/{k}"] for k in self.names}
        wire, _ = self.uplink.encode(delta, {}, torch_generator(UPLINK, self.s.seed, req.round, client_id))
        return Done(
            round=req.round,
            delta=wire,
            steps=plan.steps,
            local_train_s=float(meta[0]),
            client_sq_norm=sq,
            peak_bytes=self.part_bytes + int(meta[2]),
            flops=float(meta[1]),
        )
