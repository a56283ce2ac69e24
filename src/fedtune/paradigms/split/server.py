"""Split learning, server side: the server's part of the model, driven one micro-batch at a time.

Each sampled client has a session: a generator that yields the next message for that client and
is sent its reply (``_session``: it opens the round, runs the micro-batches of its shape,
``_u_shape`` or ``_vanilla``, and finishes with the client part's update). ``per_client``
(SplitFed v1) runs every client's session in lockstep, each with its own copy of the server part,
and averages the copies at the round's end
with the configured aggregator. ``shared`` (SplitFed v2) runs the sessions one client after
another on the one server part; a client that drops mid-turn has its turn undone, so the part
never keeps half a client's steps. The client parts are aggregated like parameter sharing's
updates. Every reply is checked before it is used: a wrong round or step, a shape the cut does not
have, a mask or label outside its range, a non-finite value or a count beyond the caps drops the
client for the round with the reason.
"""

from __future__ import annotations

import math
import time
from collections.abc import Generator
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import torch

from fedtune.adapters.split import SplitModel
from fedtune.aggregation.base import Aggregator, Contribution
from fedtune.aggregation.clipping import fused_norm, update_norm
from fedtune.aggregation.weighting import WeightCap
from fedtune.client.local_training import make_optimizer, optimizer_step
from fedtune.client.schedule import UpdateBound
from fedtune.config.training import TrainingConfig
from fedtune.core import rng
from fedtune.core.errors import RunError
from fedtune.core.types import Params, ServerState
from fedtune.data.tokenize import IGNORE
from fedtune.paradigms.base import (
    BadReply,
    Conversation,
    EvaluateAdapter,
    Exchange,
    check_cost,
    check_numbers,
    check_update,
    cost_metrics,
    decode_or_drop,
    update_limit,
    weight_or_drop,
)
from fedtune.paradigms.split.messages import Activations, Back, BackReply, Done, Forward
from fedtune.paradigms.split.steps import StepPlan, sq_norm
from fedtune.wire.link import Link, max_wire_bytes


@dataclass(frozen=True)
class SplitSettings:
    shape: str  # "u" or "vanilla"
    server_part: str  # "shared" or "per_client"
    num_clients: int
    seed: int
    weighting: str
    weight_cap: WeightCap | None
    training: TrainingConfig
    rounds: int
    max_seq_len: int
    max_micro_batches: int  # a round's micro-batches per client, whatever its data (paradigm.max_micro_batches)
    max_update_norm: float | UpdateBound | None = None  # bounds a client part's update and the server part's change


class SplitState(NamedTuple):
    client: NamedTuple  # the client part aggregator's state
    server: NamedTuple  # per_client: the server part aggregator's state (shared: unused, empty)


class _Part:
    """A server part being trained: its tensors (leaves), an optimizer, the squared norm of a finished step."""

    def __init__(self, params: Params, training: TrainingConfig):
        self.start = params  # where this session's training of the part began
        self.params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        self.opt = make_optimizer(training.optimizer, list(self.params.values()), training.lr, training.weight_decay)
        self.sq = 0.0
        self.max_norm = training.max_grad_norm

    def step(self, client_sq: float, lr: float) -> None:
        optimizer_step(self.opt, list(self.params.values()), lr, (), self.max_norm, self.sq + client_sq)

    def values(self) -> Params:
        return {k: v.detach().clone() for k, v in self.params.items()}


@dataclass
class _Tally:
    """A session's running sums, and the gradient at the first cut not yet sent."""

    error: float = 0.0  # the largest relative error of hidden states or gradients through the codecs
    loss: float = 0.0  # summed over target positions
    tokens: float = 0.0  # target positions
    fed: int = 0  # input tokens of its micro-batches (the masks the server saw)
    grad: Params = field(default_factory=dict)  # wire form of dL/dh at the first cut of the last micro-batch


@dataclass
class _Outcome:
    """What one client's finished session leaves: its client-part update and what the round cost."""

    contribution: Contribution
    server_delta: Params  # per_client: its copy of the server part minus the round's start
    loss: float
    tokens: int
    local_train_s: float
    micro_batches: int
    steps: int
    codec_error: float  # the largest relative error of hidden states or gradients through the codecs
    peak_bytes: int = 0
    flops: float = 0.0
    fed: int = 0  # input tokens of its micro-batches (the masks the server saw)


class SplitLearning:
    name = "split"

    def __init__(
        self,
        split: SplitModel,
        names: dict[str, str],
        client_names: list[str],
        server_names: list[str],
        aggregator: Aggregator,
        server_aggregator: Aggregator | None,
        settings: SplitSettings,
        initial: Params,
        uplink: Link,
        downlink: Link,
        activations: Link,
        evaluate_adapter: EvaluateAdapter | None = None,
    ):
        """``names``: every adapter tensor name -> its full parameter name in the model."""
        self.split, self.names, self.s = split, names, settings
        self.client_names, self.server_names = client_names, server_names
        self.aggregator, self.server_aggregator = aggregator, server_aggregator
        self.initial, self.evaluate_adapter = initial, evaluate_adapter
        self.uplink, self.downlink, self.activations = uplink, downlink, activations
        config = split.lm.config
        self.hidden, self.vocab = int(config.hidden_size), int(split.lm.get_output_embeddings().weight.shape[0])
        b, t = settings.training.batch_size, settings.max_seq_len
        n_client = sum(initial[k].numel() for k in client_names)
        self.reply_cap = max(
            max_wire_bytes(b * t * self.hidden + 2 * b * t, 8),  # activations with mask and labels
            max_wire_bytes(n_client, len(client_names)),  # the client part's update
        )

    # ---- the paradigm seam

    def initial_state(self) -> ServerState:
        client = {k: self.initial[k] for k in self.client_names}
        server = {k: self.initial[k] for k in self.server_names}
        server_agg = self.server_aggregator.init(server) if self.server_aggregator is not None else ()
        return ServerState(0, dict(self.initial), SplitState(self.aggregator.init(client), server_agg))

    def round(self, r: int, state: ServerState, clients: list[int]) -> Conversation[tuple[ServerState, dict]]:
        start = time.perf_counter()
        client_part = {k: state.params[k] for k in self.client_names}
        server_part = {k: state.params[k] for k in self.server_names}
        wire = self.downlink.encode(client_part, {}, rng.torch_generator(rng.DOWNLINK, self.s.seed, r))[0]
        limits = (  # this round's bounds on a client part's update and on the server part's change
            update_limit(self.s.max_update_norm, r, client_part),
            update_limit(self.s.max_update_norm, r, server_part),
        )
        outcomes: dict[int, _Outcome] = {}
        if self.s.server_part == "per_client":
            parts = {c: _Part(server_part, self.s.training) for c in clients}
            sessions = {c: self._session(r, c, wire, client_part, parts[c], limits) for c in clients}
            outcomes = yield from self._drive(sessions)
            new_server = server_part
        else:
            current = server_part
            for c in sorted(clients):  # client after client, each from the part as the previous left it
                part = _Part(current, self.s.training)  # a fresh optimizer a turn, as each client's training starts one
                done = yield from self._drive({c: self._session(r, c, wire, client_part, part, limits)})
                if c in done:  # a client that drops mid-turn leaves the part as it was before its turn
                    outcomes.update(done)
                    current = part.values()
            new_server = current
        used = [outcomes[c] for c in sorted(outcomes)]
        if not used:  # the loop's quorum check stops a round before this with federation.min_clients >= 1
            raise RunError(f"round {r}: no client finished its split session")
        new_client, client_agg = self.aggregator.aggregate(
            client_part, [o.contribution for o in used], state.algorithm.client
        )
        server_agg = state.algorithm.server
        if self.s.server_part == "per_client":
            assert self.server_aggregator is not None
            copies = [o.contribution._replace(delta=o.server_delta) for o in used]
            new_server, server_agg = self.server_aggregator.aggregate(server_part, copies, server_agg)
        tokens = sum(o.tokens for o in used)
        metrics: dict[str, Any] = {
            "train_loss": sum(o.loss for o in used) / tokens if tokens else float("nan"),
            "local_train_s": sum(o.local_train_s for o in used),
            "local_steps": sum(o.steps for o in used),
            "local_micro_batches": sum(o.micro_batches for o in used),
            **cost_metrics([o.peak_bytes for o in used], [o.flops for o in used], [o.fed for o in used]),
            "server_part_s": time.perf_counter() - start,
            "activation_codec_error": max(o.codec_error for o in used),
            **self.aggregator.metrics(client_agg),
        }
        params = {**{k: new_client[k] for k in self.client_names}, **{k: new_server[k] for k in self.server_names}}
        return replace(state, params=params, algorithm=SplitState(client_agg, server_agg)), metrics

    def evaluate(self, r: int, state: ServerState, per_client: bool) -> Conversation[dict]:
        out: dict[str, Any] = {}
        if self.evaluate_adapter is not None:
            out.update(self.evaluate_adapter(state.params, r))
        return out
        yield  # a conversation without exchanges: the server holds both parts of the model

    def final_adapters(self, state: ServerState) -> dict[str, Params]:
        return {"": state.params}

    def info(self) -> dict[str, Any]:
        cut = self.split.cut
        front, back = self.split.client_blocks()
        return {
            "split": {
                "shape": cut.shape,
                "client_blocks": [*front, *back],
                "server_blocks": list(range(cut.front, self.split.layers - cut.back)),
                "server_part": self.s.server_part,
                "client_adapter_values": sum(self.initial[k].numel() for k in self.client_names),
                "server_adapter_values": sum(self.initial[k].numel() for k in self.server_names),
            }
        }

    # ---- sessions

    def _drive(self, sessions: dict[int, Generator]) -> Conversation[dict[int, _Outcome]]:
        """Run sessions in lockstep: one exchange carries each running session's next message."""
        pending: dict[int, Any] = {c: next(s) for c, s in sessions.items()}
        outcomes: dict[int, _Outcome] = {}

        def read(client: int, reply) -> tuple[str, Any]:
            try:
                return "next", sessions[client].send(reply)
            except StopIteration as done:
                return "done", done.value

        while pending:
            replies = yield Exchange("train", pending, (Activations, BackReply, Done), read, self.reply_cap)
            for c in replies.dropped:
                sessions[c].close()
            pending = {}
            for c, (kind, value) in replies.accepted.items():
                if kind == "next":
                    pending[c] = value
                else:
                    outcomes[c] = value
        return outcomes

    def _session(
        self,
        r: int,
        c: int,
        wire: Params,
        client_part: Params,
        part: _Part,
        limits: tuple[float | None, float | None],
    ) -> Generator[Any, Any, _Outcome]:
        """One client's round: yields each message for it, is sent each reply; returns its outcome (``limits``:
        the bounds on its client part's update and on the server part's change in its session)."""
        act = _expect(Activations, (yield Forward(r, 0, params=wire)), r, 0)
        check_numbers(num_examples=act.num_examples, num_tokens=act.num_tokens)
        cap = self.s.weight_cap.max_examples if self.s.weight_cap is not None else None
        if act.num_examples < 1 or (cap is not None and act.num_examples > cap):
            raise BadReply(f"reports {act.num_examples} training examples (allowed 1..{cap})")
        who = f"round {r}: client {c}"
        weight = weight_or_drop(act.num_examples, act.num_tokens, self.s.weighting, self.s.weight_cap, who)
        plan = StepPlan.of(self.s.training, self.s.rounds, r, act.num_examples, self.s.max_micro_batches)
        run = self._u_shape if self.s.shape == "u" else self._vanilla
        tally = yield from run(r, c, plan, part, act, _Tally(error=act.codec_error))
        finish = Forward(r, plan.count, grad=tally.grad, server_sq_norm=part.sq, continues=True)
        done = _expect(Done, (yield finish), r, None)
        check_numbers(steps=done.steps, local_train_s=done.local_train_s)
        check_cost(done.peak_bytes, done.flops)
        if done.steps != plan.steps:
            raise BadReply(f"reports {done.steps} optimizer steps; its round has {plan.steps}")
        part.step(_client_sq(done.client_sq_norm), plan.lr(plan.count - 1))
        delta = decode_or_drop(self.uplink, done.delta, client_part, "the client part's update")
        client_limit, server_limit = limits
        check_update(delta, client_part, client_limit)
        copy = part.values()
        moved = {k: copy[k] - part.start[k] for k in copy}  # the server part's change in this client's session
        norm = update_norm(moved)
        if server_limit is not None and not norm <= server_limit:
            raise BadReply(
                f"its session moved the server part by {norm:.4g}, over aggregation.max_update_norm={server_limit:.4g}"
            )
        server_delta = moved if self.s.server_part == "per_client" else {}  # (its copy started at the round's part)
        return _Outcome(
            Contribution(c, delta, weight),
            server_delta,
            tally.loss,
            int(tally.tokens),
            done.local_train_s,
            plan.count,
            plan.steps,
            tally.error,
            done.peak_bytes,
            done.flops,
            tally.fed,
        )

    def _u_shape(
        self, r: int, c: int, plan: StepPlan, part: _Part, act: Activations, tally: _Tally
    ) -> Generator[Any, Any, _Tally]:
        """Shape u: the middle blocks on each micro-batch; the client sends the gradient at the second cut.

        A step's first micro-batch's activations come with a ``Forward``; within a step, the next
        micro-batch's ride in the ``BackReply`` and the last gradient at the first cut in the ``Back``."""
        for t in range(plan.count):
            if t > 0 and plan.group(t)[0] == t:
                act = yield from self._next_forward(r, t, plan, part, tally)
            # else (within a step): ``act`` came with the last BackReply
            x, mask = self._take(act, tally)
            out = self.split.middle(self._full(part.params), x, mask)  # (B, T, H)
            gen = rng.torch_generator(rng.SPLIT_MIDDLE, self.s.seed, r, c, t)
            sent = self.activations.encode({"h": out.detach()}, {}, gen)[0]
            back = _expect(BackReply, (yield Back(r, t, sent, grad=tally.grad)), r, t)
            tally.grad = {}
            check_numbers(tokens=back.tokens, codec_error=back.codec_error)
            due = t + 1 < plan.count and not plan.ends_step(t)  # the next micro-batch's activations
            if back.carries != due:
                what = "no activations" if due else "activations"
                raise BadReply(f"sent {what} for micro-batch {t + 1} with micro-batch {t}'s gradient")
            if not math.isfinite(back.loss_sum):
                raise BadReply(f"diverged: non-finite loss at micro-batch {t}")
            check_numbers(loss_sum=back.loss_sum)
            if back.tokens > mask.numel():
                raise BadReply(f"{back.tokens} target positions in a micro-batch of {mask.numel()} tokens")
            grad = self._tensor(back.grad, out.shape, "the gradient at the second cut")
            out.backward(grad.to(out.dtype))
            tally.loss, tally.tokens = tally.loss + back.loss_sum, tally.tokens + back.tokens
            tally.error = max(tally.error, back.codec_error)
            if due:
                act = back.carried()
            self._gradient_at_cut(r, c, t, x, plan, part, tally)
        return tally

    def _vanilla(
        self, r: int, c: int, plan: StepPlan, part: _Part, act: Activations, tally: _Tally
    ) -> Generator[Any, Any, _Tally]:
        """Shape vanilla: the rest of the model, head and loss, on each micro-batch with the client's labels."""
        declared = counted = 0
        for t in range(plan.count):
            if t > 0:
                act = yield from self._next_forward(r, t, plan, part, tally)
            x, mask = self._take(act, tally)
            labels = self._labels(act, mask)
            if t == plan.group(t)[0]:
                declared, counted = act.step_tokens, 0
            elif act.step_tokens != declared:
                raise BadReply(f"micro-batch {t} declares {act.step_tokens} step tokens, its step {declared}")
            if declared < 1:
                raise BadReply(f"micro-batch {t}'s optimizer step declares {declared} target tokens")
            value, positions = self.split.back_loss(self._full(part.params), x, mask, labels, self.split.cut.front)
            if not torch.isfinite(value):
                raise BadReply(f"diverged: non-finite loss at micro-batch {t}")
            (value / declared).backward()
            counted += positions
            if plan.ends_step(t) and counted != declared:
                raise BadReply(f"its step declared {declared} target tokens, its labels hold {counted}")
            tally.loss, tally.tokens = tally.loss + float(value.detach()), tally.tokens + positions
            self._gradient_at_cut(r, c, t, x, plan, part, tally)
        return tally

    def _next_forward(
        self, r: int, t: int, plan: StepPlan, part: _Part, tally: _Tally
    ) -> Generator[Any, Any, Activations]:
        """Ask for micro-batch ``t``'s activations with the last gradient at the first cut; when micro-batch
        ``t - 1`` ended an optimizer step, both sides take it now (global clipping over both parts)."""
        finished = plan.ends_step(t - 1)
        request = Forward(r, t, grad=tally.grad, server_sq_norm=part.sq if finished else None, continues=True)
        act = _expect(Activations, (yield request), r, t)
        tally.grad = {}
        if finished:
            part.step(_client_sq(act.client_sq_norm), plan.lr(t - 1))
        return act

    def _take(self, act: Activations, tally: _Tally) -> tuple[torch.Tensor, torch.Tensor]:
        """A micro-batch's hidden states (a leaf that will hold their gradient) and mask, checked and counted."""
        check_numbers(codec_error=act.codec_error, step_tokens=act.step_tokens)
        tally.error = max(tally.error, act.codec_error)
        hidden, mask = self._activations(act)
        tally.fed += int(mask.sum())
        return hidden.detach().requires_grad_(True), mask

    def _gradient_at_cut(self, r: int, c: int, t: int, x: torch.Tensor, plan: StepPlan, part: _Part, tally: _Tally):
        """Micro-batch ``t``'s gradient at the first cut, encoded for the client's next request; the server
        part's squared gradient norm once ``t`` ends an optimizer step."""
        gen = rng.torch_generator(rng.SPLIT_CUT_GRAD, self.s.seed, r, c, t)
        tally.grad = self.activations.encode({"h": x.grad}, {}, gen)[0]
        if plan.ends_step(t):
            part.sq = sq_norm(part.params.values())

    def _full(self, params: Params) -> Params:
        return {self.names[k]: v for k, v in params.items()}

    def _activations(self, act: Activations) -> tuple[torch.Tensor, torch.Tensor]:
        """The hidden states (B, T, H) and mask (B, T) of a reply, checked against what the cut can carry."""
        b, t = self.s.training.batch_size, self.s.max_seq_len
        like = torch.empty(b * t * self.hidden, device="meta")
        hidden = decode_or_drop(self.activations, act.hidden, {"h": like}, "the hidden states")["h"]
        if hidden.ndim != 3 or not (1 <= hidden.shape[0] <= b and 1 <= hidden.shape[1] <= t):
            raise BadReply(
                f"hidden states of shape {tuple(hidden.shape)}; the cut carries (<= {b}, <= {t}, {self.hidden})"
            )
        if hidden.shape[2] != self.hidden or not hidden.is_floating_point():
            raise BadReply(f"hidden states of shape {tuple(hidden.shape)} and dtype {hidden.dtype}")
        if not math.isfinite(fused_norm({"h": hidden})):
            raise BadReply("hidden states hold NaN or Inf")
        mask = act.attention_mask
        if mask.shape != hidden.shape[:2] or mask.dtype != torch.uint8 or bool((mask > 1).any()):
            raise BadReply(f"attention mask of shape {tuple(mask.shape)} and dtype {mask.dtype}: not 0/1 uint8 (B, T)")
        if bool((mask.sum(dim=1) == 0).any()):
            raise BadReply("an attention mask row without any token")
        dtype = next(iter(self.split.model.parameters())).dtype
        return hidden.to(dtype), mask.long()

    def _labels(self, act: Activations, mask: torch.Tensor) -> torch.Tensor:
        labels = act.labels
        if labels.shape != mask.shape or labels.dtype != torch.int64:
            raise BadReply(
                f"labels of shape {tuple(labels.shape)} and dtype {labels.dtype}, expected {tuple(mask.shape)} int64"
            )
        if bool(((labels != IGNORE) & ((labels < 0) | (labels >= self.vocab))).any()):
            raise BadReply(f"labels outside the vocabulary (0..{self.vocab - 1}, or {IGNORE})")
        return labels

    def _tensor(self, wire: Params, shape: torch.Size, what: str) -> torch.Tensor:
        like = torch.empty(shape, device="meta")
        value = decode_or_drop(self.activations, wire, {"h": like}, what)["h"]
        if value.shape != shape or not value.is_floating_point():
            raise BadReply(f"{what} has shape {tuple(value.shape)}, expected {tuple(shape)}")
        if not math.isfinite(fused_norm({"h": value})):
            raise BadReply(f"{what} holds NaN or Inf")
        return value


def _expect(kind: type, reply: Any, r: int, step: int | None):
    """``reply`` if it is a ``kind`` for round ``r`` (and micro-batch ``step``), else BadReply."""
    if not isinstance(reply, kind):
        raise BadReply(f"sent a {type(reply).__name__} where a {kind.__name__} was due")
    if reply.round != r or (step is not None and reply.step != step):
        got = f"round {reply.round}" + (f" micro-batch {reply.step}" if step is not None else "")
        want = f"round {r}" + (f" micro-batch {step}" if step is not None else "")
        raise BadReply(f"answered {got}, expected {want}")
    return reply


def _client_sq(value: float | None) -> float:
    """The client's squared gradient norm at the end of an optimizer step: required, finite, >= 0."""
    if value is None:
        raise BadReply("did not send its squared gradient norm at the end of an optimizer step")
    check_numbers(client_sq_norm=value)
    return float(value)


__all__ = ["SplitLearning", "SplitSettings", "SplitState"]
