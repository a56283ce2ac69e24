"""Parameter sharing, server side: send the global adapter, read updates, aggregate them.

One exchange per round. Every aggregator (FedAvg, the FedOpt family, robust combiners, SCAFFOLD,
LoRA-aware aggregation) sits behind ``absorb``, the code after the exchange. A reply is used only
if it is a train reply for this round whose update decodes with the uplink codecs and fits the
global adapter (keys, shapes, dtypes, finite, within ``aggregation.max_update_norm``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch

from fedtune.aggregation.base import Aggregator, Contribution
from fedtune.aggregation.clipping import update_norm
from fedtune.aggregation.flat import unflatten
from fedtune.aggregation.weighting import WeightCap
from fedtune.client.schedule import RoundSchedule, UpdateBound
from fedtune.core import rng
from fedtune.core.types import Params, ServerState
from fedtune.paradigms.base import (
    BadReply,
    Conversation,
    Exchange,
    Signature,
    check_answered,
    check_cost,
    check_numbers,
    check_update,
    cost_metrics,
    decode_or_drop,
    shared,
    signature,
    update_limit,
    weight_or_drop,
)
from fedtune.paradigms.evaluation import EvalRequest, client_record, eval_exchange
from fedtune.paradigms.parameter_sharing.downlink import ReplicaDownlink
from fedtune.paradigms.parameter_sharing.messages import TrainReply, TrainRequest
from fedtune.paradigms.parameter_sharing.secure_server import SecureAggregation, read_keys, secure_sum
from fedtune.privacy.accounting import SampleLevel
from fedtune.privacy.plan import PrivacyPlan
from fedtune.wire.link import Link, max_wire_bytes

MAX_STEPS = 10_000_000  # a round's local steps beyond this are not a client's report but an attack


class Update(NamedTuple):
    """A usable reply: the decoded update and what aggregation and the metrics need from it."""

    contribution: Contribution
    train_loss: float
    local_train_s: float
    steps: int
    peak_bytes: int = 0
    flops: float = 0.0
    examples: int = 0  # the client's training examples, as it reported them
    tokens: int = 0  # input tokens it trained on this round


@dataclass(frozen=True)
class SharingSettings:
    num_clients: int
    seed: int
    weighting: str = "examples"
    max_update_norm: float | UpdateBound | None = None  # a number, or auto's bound (paradigms.base.update_limit)
    downlink_updates: bool = False  # send each client the change to the adapter it holds
    weight_cap: WeightCap | None = None  # the most a client's reported examples/tokens may weigh
    schedule: RoundSchedule | None = None  # clients' local steps and learning rates (bounds SCAFFOLD's Δc)
    dp_sgd: SampleLevel | None = None  # clients train with DP-SGD: each one's record-level epsilon is reported
    privacy: PrivacyPlan | None = None  # client-level DP: its epsilon after each round is reported


class ParameterSharing:
    name = "parameter_sharing"

    def __init__(
        self,
        aggregator: Aggregator,
        settings: SharingSettings,
        initial: Params,
        uplink: Link | None = None,
        downlink: Link | None = None,
        evaluate_adapter: Callable[[Params, int], dict[str, Any]] | None = None,
        secure: SecureAggregation | None = None,
    ):
        """``evaluate_adapter(params, r)``: held-out metrics of a global adapter after round ``r`` on the
        server's eval set. ``secure``: updates reach the server only as a sum (secure_server.py)."""
        self.aggregator, self.settings, self.initial = aggregator, settings, initial
        self.uplink, self.downlink = uplink or Link(), downlink or Link()
        self.evaluate_adapter, self.secure = evaluate_adapter, secure

    def initial_state(self) -> ServerState:
        return ServerState(0, self.initial, self.aggregator.init(self.initial))

    def round(self, r: int, state: ServerState, clients: list[int]) -> Conversation[tuple[ServerState, dict]]:
        s = self.settings
        sent = dict(self.aggregator.broadcast(state.algorithm))
        scaffold_c = sent.pop("scaffold", {})
        if sent:
            raise RuntimeError(f"aggregator {self.aggregator.name} broadcasts {sorted(sent)}, which no message carries")
        views = {c: self.aggregator.client_view(state.params, state.algorithm, c) for c in clients}
        gen = rng.torch_generator(rng.DOWNLINK, s.seed, r)
        replicas = state.replicas
        if s.downlink_updates:
            downlink = ReplicaDownlink(self.downlink, self.initial, state.replicas)
            wires, kind = downlink.encode(views, gen), "update"
            replicas = downlink.replicas
        else:
            wires, kind = shared(views, lambda v: self.downlink.encode(v, {}, gen)[0]), "full"
        limit = update_limit(s.max_update_norm, r, state.params)
        secure = self.secure.clipped_to(limit) if self.secure is not None else None
        spec = secure.spec(len(clients)) if secure is not None else {}
        messages = shared(wires, lambda w: TrainRequest(r, params=w, scaffold_c=scaffold_c, downlink=kind, secagg=spec))
        if secure is not None:
            return (yield from self._secure_round(r, state, clients, secure, messages, replicas))

        signatures: dict[int, Signature] = {}  # by view: clients at one rank share one (views holds them)

        def read(client_id: int, reply: TrainReply) -> Update:
            view = views[client_id]
            expected = signatures.get(id(view)) or signatures.setdefault(id(view), signature(view))
            delta = self._read(r, reply, view, scaffold_c, expected, limit)
            who = f"round {r}: client {client_id}"
            weight = weight_or_drop(reply.num_examples, reply.num_tokens, s.weighting, s.weight_cap, who)
            extras = {"scaffold": reply.scaffold_delta_c} if scaffold_c else {}
            return Update(
                Contribution(client_id, delta, weight, extras),
                reply.train_loss,
                reply.local_train_s,
                reply.steps,
                reply.peak_bytes,
                reply.flops,
                reply.num_examples,
                reply.trained_tokens,
            )

        largest = max((_size(v) for v in views.values()), default=(0, 0))
        control = _size(scaffold_c)  # SCAFFOLD's control delta travels beside the update
        cap = max_wire_bytes(largest[0] + control[0], largest[1] + control[1])
        used: list[Update] = []
        if messages:  # Poisson sampling (client-level DP) can sample nobody: the round is then the noise alone
            replies = yield Exchange("train", messages, TrainReply, read, cap)
            used = [replies.accepted[c] for c in sorted(replies.accepted)]
        params, agg_state = self.aggregator.aggregate(state.params, [u.contribution for u in used], state.algorithm)
        metrics = self._metrics(state, used, agg_state)
        return replace(state, params=params, algorithm=agg_state, replicas=replicas), metrics

    def _metrics(self, state: ServerState, used: list[Update], agg_state, extra: dict | None = None) -> dict[str, Any]:
        """A round's record from the updates used (``extra``: the secure round's own figures)."""
        return {
            "train_loss": _weighted_loss([u.train_loss for u in used], [u.contribution.weight for u in used]),
            "local_train_s": sum(u.local_train_s for u in used),
            "local_steps": sum(u.steps for u in used),
            **cost_metrics([u.peak_bytes for u in used], [u.flops for u in used], [u.tokens for u in used]),
            **(extra or {}),
            **self.aggregator.metrics(agg_state),
            **self._epsilon(state.round + 1),
            **self._sample_level(state, used),
        }

    def _epsilon(self, r: int) -> dict[str, float]:
        """Client-level DP: the accountant's epsilon once round ``r`` is noised (every round is, once)."""
        plan = self.settings.privacy
        return {} if plan is None else {"dp_epsilon": plan.epsilon(r)}

    def _sample_level(self, state: ServerState, used: list[Update]) -> dict[str, Any]:
        """DP-SGD: every client's record-level epsilon so far (a client counts a round once it was sampled)."""
        acc = self.settings.dp_sgd
        if acc is None:
            return {}
        last = next((rec["dp_sgd_epsilon"] for rec in reversed(state.history) if "dp_sgd_epsilon" in rec), {})
        out = dict(last)
        for u in used:
            c = u.contribution.client_id
            rounds = 1 + sum(str(c) in rec.get("dropped", {}) or c in rec.get("clients", []) for rec in state.history)
            out[str(c)] = acc.epsilon(u.examples, rounds)
        return {
            "dp_sgd_epsilon": dict(sorted(out.items(), key=lambda kv: int(kv[0]))),
            "dp_sgd_epsilon_max": max(out.values(), default=0.0),
        }

    def _secure_round(
        self, r: int, state: ServerState, clients: list[int], sec: SecureAggregation, messages: dict, replicas
    ) -> Conversation[tuple[ServerState, dict]]:
        """A round whose updates reach the server only as their sum (privacy.secure_aggregation)."""
        template = self.initial  # secure aggregation runs without client ranks: every view is the adapter
        n_values = sum(t.numel() for t in template.values())
        keyed: dict[int, tuple[Update, tuple[bytes, bytes]]] = {}
        if len(clients) >= sec.needed(len(clients)):

            def read(client_id: int, reply: TrainReply) -> tuple[Update, tuple[bytes, bytes]]:
                if reply.delta:
                    raise BadReply("sent its update in the clear under secure aggregation; it was not read")
                self._check_meta(r, reply)
                meta = Update(Contribution(client_id, {}, 1.0), reply.train_loss, reply.local_train_s, reply.steps)
                meta = meta._replace(
                    peak_bytes=reply.peak_bytes,
                    flops=reply.flops,
                    examples=reply.num_examples,
                    tokens=reply.trained_tokens,
                )
                return meta, read_keys(reply.secagg_keys)

            replies = yield Exchange("train", messages, TrainReply, read, max_wire_bytes(64, 2))
            keyed = dict(replies.accepted)
            roster = {c: keys for c, (_, keys) in keyed.items()}
            flat, summed, sec_metrics = yield from secure_sum(sec, r, roster, len(clients), n_values)
        else:  # too few sampled to hide anyone (Poisson sampling): no client update this round
            flat, summed, sec_metrics = torch.zeros(n_values), [], {"secagg_summed": 0, "secagg_skipped": 1}
        if flat is None:  # skipped (secure_sum logged why): the round leaves the adapter as it was
            params, agg_state = state.params, state.algorithm
        else:
            total = unflatten(flat, {k: template[k] for k in sorted(template)})  # clients flatten in name order
            params, agg_state = self.aggregator.aggregate_sum(  # type: ignore[attr-defined]  (a Pipeline)
                state.params, total, len(summed), state.algorithm, sec.noised_by_clients
            )
        used = [keyed[c][0] for c in summed]
        metrics = self._metrics(state, used, agg_state, sec_metrics)
        return replace(state, params=params, algorithm=agg_state, replicas=replicas), metrics

    def _check_meta(self, r: int, reply: TrainReply) -> None:
        check_answered(reply, r)
        check_numbers(train_loss=reply.train_loss, local_train_s=reply.local_train_s, steps=reply.steps)
        check_cost(reply.peak_bytes, reply.flops, reply.trained_tokens)

    def _read(
        self, r: int, reply: TrainReply, view: Params, scaffold_c: Params, expected: Signature, limit: float | None
    ) -> Params:
        """The decoded update, or BadReply with why the reply cannot be used (``limit``: the round's bound)."""
        self._check_meta(r, reply)
        if scaffold_c:
            check_update(reply.scaffold_delta_c, scaffold_c, what="control variate: ")
            self._check_control(r, reply, scaffold_c, limit)
        delta = decode_or_drop(self.uplink, reply.delta, view, "the update")
        check_update(delta, view, limit, expected)
        return delta

    def _check_control(self, r: int, reply: TrainReply, c: Params, limit: float | None) -> None:
        """BadReply unless the control variate's change stays within ``aggregation.max_update_norm``.

        Δc_i = c_i+ − c_i = (x − y_i) / Σlr − c (SCAFFOLD option II), so ‖Δc_i + c‖ · Σlr is the norm of the
        client's own local update, bounded as every update is (1% slack for float rounding); Σlr follows
        from the schedule and the client's step count, itself checked against its example count.
        """
        s = self.settings
        if limit is None or s.schedule is None:
            return
        n = reply.num_examples
        if s.weight_cap is not None and n > s.weight_cap.max_examples:
            raise BadReply(
                f"{n} examples, more than federation.max_client_examples={s.weight_cap.max_examples} allows: "
                "its control variate cannot be bounded"
            )
        if reply.steps != s.schedule.steps(n) or reply.steps > MAX_STEPS:
            raise BadReply(f"{reply.steps} local steps do not follow from {n} examples and the training config")
        lr_sum = s.schedule.lr_sum(r, reply.steps)
        moved = update_norm({k: reply.scaffold_delta_c[k].float() + c[k].float() for k in c}) * lr_sum
        if not moved <= limit * 1.01:
            raise BadReply(
                f"control variate: its change means a local update of norm {moved:.4g}, over "
                f"aggregation.max_update_norm={limit:.4g}"
            )

    def final_adapters(self, state: ServerState) -> dict[str, Params]:
        return {"": state.params}

    def info(self) -> dict[str, Any]:
        return {}

    def evaluate(self, r: int, state: ServerState, per_client: bool) -> Conversation[dict]:
        out: dict[str, Any] = {}
        if self.evaluate_adapter is not None:
            out.update(self.evaluate_adapter(state.params, r))
        if per_client:  # every client evaluates the global model, as it receives it, on its own held-out share
            n = self.settings.num_clients
            views = {c: self.aggregator.client_view(state.params, state.algorithm, c) for c in range(n)}
            link = self.downlink if not self.settings.downlink_updates else Link()
            gen = rng.torch_generator(rng.EVAL_DOWNLINK, self.settings.seed, r)
            wires = shared(views, lambda v: link.encode(v, {}, gen)[0])
            replies = yield eval_exchange(shared(wires, lambda w: EvalRequest(r, params=w)), r)
            out.update(client_record(replies.accepted, "client_eval"))
        return out


def _size(params: Params) -> tuple[int, int]:
    """(values, tensors) in ``params``."""
    return sum(t.numel() for t in params.values()), len(params)


def _weighted_loss(losses: list[float], weights: list[float]) -> float:
    total = sum(weights)
    return sum(w * x for x, w in zip(losses, weights, strict=True)) / total if total else float("nan")


__all__ = ["ParameterSharing", "SharingSettings"]
