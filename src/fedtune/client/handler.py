"""Client side: decode a request, train or evaluate locally, encode the reply.

Knows nothing of runtimes: it maps (client id, bytes, client state) to (bytes, client state).
In simulation one handler serves many virtual clients over one shared model, and the runtime
keeps each client's state (e.g. SCAFFOLD's c_i); in deployment a client keeps its own.
Every random choice of a client's round derives from (seed, round, client id), so a resumed
run replays exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from fedtune.adapters.adapter_model import AdapterModel
from fedtune.adapters.lora_math import rank_of
from fedtune.client.batching import micro_batches
from fedtune.client.corrections import FedProx, Scaffold, updated_client_control
from fedtune.client.local_training import train_locally
from fedtune.client.schedule import lr_at
from fedtune.config import TrainingConfig
from fedtune.data.tokenize import Encoded, collate
from fedtune.evaluation.harness import EvalSet, evaluate
from fedtune.reporting.console import bar_disabled
from fedtune.types import EvalReply, EvalRequest, Params, TrainReply, TrainRequest
from fedtune.wire.link import Link, apply_change, generator
from fedtune.wire.messages import decode_message, encode_message

HELD = "held/"  # client-state prefix of the adapter a client holds (downlink updates)


@dataclass(frozen=True)
class ClientData:
    """One client's local share: training sequences and an optional held-out set."""

    train: list[Encoded]
    holdout: EvalSet | None = None

    @property
    def num_tokens(self) -> int:
        return sum(e.num_target_tokens for e in self.train)


@dataclass(frozen=True)
class EvalSettings:
    batch_size: int = 16
    exact: bool = False
    max_new_tokens: int = 24
    group_by: str | None = None


def round_plan(
    seed: int, round_index: int, client_id: int, num_examples: int, cfg: TrainingConfig
) -> tuple[int, list[np.ndarray]]:
    """(torch seed, micro-batch index arrays) of one client's round: a pure function of its arguments."""
    rng = np.random.default_rng([seed, round_index, client_id])
    torch_seed = int(rng.integers(2**63 - 1))
    plan = micro_batches(num_examples, cfg.batch_size, cfg.grad_accum, rng, cfg.local_steps, cfg.local_epochs)
    return torch_seed, plan


class ClientHandler:
    def __init__(
        self,
        adapter: AdapterModel,
        tokenizer: PreTrainedTokenizerBase,
        data: dict[int, ClientData],
        training: TrainingConfig,
        total_rounds: int,
        seed: int,
        eval_settings: EvalSettings | None = None,
        progress: bool = False,
        uplink: Link | None = None,
        downlink: Link | None = None,
        initial: Params | None = None,
    ):
        """``uplink`` encodes each update (its error-feedback residual lives in the client state);
        ``downlink`` decodes the global adapter as the server encoded it. ``initial`` is the seeded
        initial adapter, what every client holds before its first downlink update."""
        self.uplink, self.downlink = uplink or Link(), downlink or Link()
        self.initial = initial
        self.adapter, self.tokenizer, self.data = adapter, tokenizer, data
        self.training, self.total_rounds, self.seed = training, total_rounds, seed
        self.eval_settings = eval_settings or EvalSettings()
        self.progress = progress

    def handle(self, client_id: int, payload: bytes, state: Params | None = None) -> tuple[bytes, Params]:
        """Serve one request; ``state`` is this client's persistent state, returned updated."""
        if client_id not in self.data:
            raise KeyError(f"this handler has no data for client {client_id}")
        msg = decode_message(payload)
        state = state or {}
        if isinstance(msg, TrainRequest):
            reply, state = self.train(client_id, msg, state)
            return encode_message(reply), state
        if isinstance(msg, EvalRequest):
            return encode_message(self.evaluate(client_id, msg)), state
        raise TypeError(f"client {client_id} cannot handle a {type(msg).__name__}")

    def _receive(self, req: TrainRequest, state: Params) -> tuple[Params, Params]:
        """(the adapter to train from, client state): a full adapter, or a change to the one held."""
        if req.downlink == "full":
            return self._load(req.params), state
        if req.downlink != "update":
            raise ValueError(f"unknown downlink kind {req.downlink!r}")
        if self.initial is None:
            raise ValueError("a downlink update needs the initial adapter this client started from")
        names = sorted(self.adapter.params)
        held = {k: state[HELD + k] for k in names} if HELD + names[0] in state else self.initial
        params = apply_change(held, self.downlink.decode(req.params, names))
        self._set(params)
        return params, {**state, **{HELD + k: v for k, v in params.items()}}

    def _load(self, wire: Params) -> Params:
        """Decode the global adapter and load it."""
        params = self.downlink.decode(wire, self.adapter.params)
        self._set(params)
        return params

    def _set(self, params: Params) -> None:
        """Activate the adapter of the rank these params have (heterogeneous ranks), then load them."""
        rank = rank_of(params)
        if rank is not None:
            self.adapter.activate(rank)
        self.adapter.set_state(params)

    def train(self, client_id: int, req: TrainRequest, state: Params) -> tuple[TrainReply, Params]:
        cfg, data = self.training, self.data[client_id]
        params, state = self._receive(req, state)  # what training starts from (lossy if the downlink is)
        names = list(self.adapter.params)
        corrections: list = []
        if cfg.proximal_mu > 0:
            corrections.append(FedProx([params[k] for k in names], cfg.proximal_mu))
        if req.control:  # SCAFFOLD: c_i starts at zero the first time a client takes part
            c_i = {k: state.get(f"control/{k}", torch.zeros_like(req.control[k])) for k in names}
            corrections.append(Scaffold([req.control[k] for k in names], [c_i[k] for k in names]))
        start = time.perf_counter()
        torch_seed, plan = round_plan(self.seed, req.round, client_id, len(data.train), cfg)
        pad = self.tokenizer.pad_token_id
        batches = [collate([data.train[i] for i in idx], pad) for idx in plan]
        steps = -(-len(batches) // cfg.grad_accum)

        def lr(step: int) -> float:
            return lr_at(
                cfg.lr, cfg.lr_schedule, cfg.warmup_ratio, step, steps, req.round, self.total_rounds, cfg.schedule_scope
            )

        bar = tqdm(
            total=steps, desc=f"  client {client_id}", leave=False, disable=bar_disabled(self.progress), unit="step"
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(torch_seed)  # dropout and any other torch randomness of this round
            result = train_locally(
                self.adapter.model,
                list(self.adapter.params.values()),
                batches,
                cfg.grad_accum,
                lr,
                cfg.weight_decay,
                cfg.max_grad_norm,
                on_step=lambda _s, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.3f}")),
                optimizer=cfg.optimizer,
                corrections=corrections,
            )
        bar.close()
        elapsed = time.perf_counter() - start
        common = dict(
            round=req.round,
            num_examples=len(data.train),
            num_tokens=data.num_tokens,
            steps=result.steps,
            train_loss=result.mean_loss,
            local_train_s=elapsed,
        )
        if result.diverged:
            return TrainReply(delta={}, status="diverged", error=result.error, **common), state
        local = self.adapter.get_state()
        delta = {k: local[k] - params[k] for k in local}
        wire, state = self.uplink.encode(delta, state, generator(self.seed, req.round, client_id, 1))
        if not req.control:
            return TrainReply(delta=wire, **common), state
        new_c = updated_client_control(c_i, req.control, params, local, result.lr_sum)
        control_delta = {k: new_c[k] - c_i[k] for k in names}
        state = {**state, **{f"control/{k}": v for k, v in new_c.items()}}
        return TrainReply(delta=wire, control_delta=control_delta, **common), state

    def evaluate(self, client_id: int, req: EvalRequest) -> EvalReply:
        holdout = self.data[client_id].holdout
        if holdout is None:
            return EvalReply(round=req.round, metrics={})
        self._load(req.params)
        s = self.eval_settings
        metrics = evaluate(
            self.adapter.model, self.tokenizer, holdout, s.batch_size, s.exact, s.max_new_tokens, None, prefix=""
        )
        return EvalReply(round=req.round, metrics={k: float(v) for k, v in metrics.items()})
