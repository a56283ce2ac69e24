"""KD-FedLLM, server side: ask for top-k distributions on a public slice, form their consensus, send it back.

One exchange per round. ``kd.downlink=logits`` (FedMD / DS-FL): the consensus goes back to the
clients next round and they distil it into their own adapters; the server holds no adapter.
``kd.downlink=adapter`` (server-side distillation, FedDF style): the server distils the consensus
into the global adapter on the same slice and sends that adapter. A reply is used only if its token
ids and probabilities have exactly the expected shape and lie in the vocabulary and in [0, 1]; a
position whose (quantised) probabilities sum to more than 1 is rescaled to sum to 1.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch

from fedtune.aggregation.weighting import WeightCap
from fedtune.core import rng
from fedtune.core.types import Params, ServerState
from fedtune.paradigms.base import (
    BadReply,
    Conversation,
    Exchange,
    check_answered,
    check_cost,
    check_numbers,
    cost_metrics,
    decode_or_drop,
    shared,
    weight_or_drop,
)
from fedtune.paradigms.evaluation import EvalRequest, client_record, eval_exchange, summarise
from fedtune.paradigms.kd.distributions import TopK, consensus, id_dtype
from fedtune.paradigms.kd.messages import LOGP, KDReply, KDRequest
from fedtune.paradigms.kd.public import PublicSet, round_slice
from fedtune.wire.link import Link, max_wire_bytes


class KDState(NamedTuple):
    """The last consensus: the public examples it is about, and its top-k per response position."""

    slice: torch.Tensor  # (S,) int64 public indices
    ids: torch.Tensor  # (P, k) int64
    logp: torch.Tensor  # (P, k) float32
    rounds: int = 0


class Scores(NamedTuple):
    """A usable reply: the client's distributions and what the metrics need."""

    top: TopK
    weight: float
    train_loss: float
    distill_loss: float | None
    local_train_s: float
    steps: int
    peak_bytes: int = 0
    flops: float = 0.0
    tokens: int = 0  # input tokens it trained on (distillation and private training)


@dataclass(frozen=True)
class KDSettings:
    downlink: str  # "logits" | "adapter"
    top_k: int
    consensus_top_k: int
    public_slice: int
    weighting: str  # "uniform" | "examples" | "confidence"
    num_clients: int
    vocab: int
    seed: int
    weight_cap: WeightCap | None = None  # the most a client's reported examples may weigh


# (global params, public indices, consensus, round) -> (new params, server distillation loss)
ServerDistil = Callable[[Params, torch.Tensor, TopK, int], tuple[Params, float]]


class KnowledgeDistillation:
    name = "kd"

    def __init__(
        self,
        settings: KDSettings,
        public: PublicSet,
        initial: Params,
        uplink: Link,
        downlink: Link,
        evaluate_adapter: Callable[[Params, int], dict[str, Any]] | None = None,
        server_distil: ServerDistil | None = None,
    ):
        """``initial``: the global adapter (downlink=adapter) or {}; ``server_distil`` for downlink=adapter."""
        self.s, self.public, self.initial = settings, public, initial
        self.uplink, self.downlink = uplink, downlink
        self.evaluate_adapter, self.server_distil = evaluate_adapter, server_distil

    def initial_state(self) -> ServerState:
        k = self.s.consensus_top_k
        empty = KDState(torch.zeros(0, dtype=torch.long), torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k))
        return ServerState(0, dict(self.initial), empty)

    def round(self, r: int, state: ServerState, clients: list[int]) -> Conversation[tuple[ServerState, dict]]:
        s, prev = self.s, state.algorithm
        score = round_slice(s.seed, r, s.public_slice, len(self.public))
        rows = self.public.positions(score)
        gen = rng.torch_generator(rng.DOWNLINK, s.seed, r)
        no_ids = torch.zeros(0, s.consensus_top_k, dtype=id_dtype(s.vocab))
        if s.downlink == "logits":
            teach = len(prev.slice) > 0
            msg = KDRequest(
                r,
                score=score,
                teach=prev.slice.to(torch.int32),
                teacher_ids=prev.ids.to(id_dtype(s.vocab)) if teach else no_ids,
                public_digest=self.public.digest,
                teacher_logp=self.downlink.encode({LOGP: prev.logp}, {}, gen)[0] if teach else {},
            )
        else:
            msg = KDRequest(
                r,
                score=score,
                teach=torch.zeros(0, dtype=torch.int32),
                teacher_ids=no_ids,
                public_digest=self.public.digest,
                params=self.downlink.encode(state.params, {}, gen)[0],
            )

        def read(client_id: int, reply: KDReply) -> Scores:
            top = self._read(r, reply, rows)
            weight = 1.0
            if s.weighting == "examples":
                who = f"round {r}: client {client_id}"
                weight = weight_or_drop(reply.num_examples, 0, "examples", s.weight_cap, who)
            return Scores(
                top,
                weight,
                reply.train_loss,
                reply.distill_loss,
                reply.local_train_s,
                reply.steps,
                reply.peak_bytes,
                reply.flops,
                reply.trained_tokens,
            )

        cap = max_wire_bytes(2 * rows * s.top_k, 2)  # ids and log-probabilities, (rows, k) each
        replies = yield Exchange("train", dict.fromkeys(clients, msg), KDReply, read, cap)
        used = [replies.accepted[c] for c in sorted(replies.accepted)]
        tops = [u.top for u in used]
        weights = torch.tensor([u.weight for u in used])  # (n,)
        if s.weighting == "confidence":  # per position: how sure each client is (its top probability, >= 1/V)
            weights = torch.stack([t.logp.max(dim=1).values.exp().clamp(min=1.0 / s.vocab) for t in tops])  # (n, P)
        agreed = consensus(tops, weights, s.vocab, s.consensus_top_k)
        new_state = replace(state, algorithm=KDState(score.long(), agreed.ids, agreed.logp, prev.rounds + 1))
        metrics = _round_metrics(used, agreed)
        if s.downlink == "adapter":
            t = time.perf_counter()
            params, loss = self.server_distil(state.params, score, agreed, r)
            new_state = replace(new_state, params=params)
            metrics.update(server_distill_loss=loss, server_distill_s=time.perf_counter() - t)
        return new_state, metrics

    def _read(self, r: int, reply: KDReply, rows: int) -> TopK:
        """The client's top-k, or BadReply with why it cannot be used."""
        s = self.s
        check_answered(reply, r)
        check_numbers(
            train_loss=reply.train_loss,
            distill_loss=reply.distill_loss,
            local_train_s=reply.local_train_s,
            steps=reply.steps,
        )
        check_cost(reply.peak_bytes, reply.flops, reply.trained_tokens)
        ids = reply.ids
        if ids.dtype != id_dtype(s.vocab) or tuple(ids.shape) != (rows, s.top_k):
            raise BadReply(
                f"token ids are {ids.dtype} {tuple(ids.shape)}, expected {id_dtype(s.vocab)} {(rows, s.top_k)} "
                f"({rows} public response positions, kd.top_k={s.top_k})"
            )
        ids = ids.long()
        if rows and (int(ids.max()) >= s.vocab or int(ids.min()) < 0):
            raise BadReply(f"token ids outside the vocabulary of {s.vocab}")
        if rows and bool((ids.sort(dim=1).values.diff(dim=1) == 0).any()):
            raise BadReply("a token id repeats within a position's top-k")
        logp = decode_or_drop(self.uplink, reply.logp, [LOGP], "the log-probabilities", rows * s.top_k)[LOGP]
        if tuple(logp.shape) != (rows, s.top_k) or not logp.is_floating_point():
            raise BadReply(f"log-probabilities are {logp.dtype} {tuple(logp.shape)}, expected {(rows, s.top_k)}")
        logp = logp.float()
        if not bool(torch.isfinite(logp).all()):
            raise BadReply("log-probabilities are not finite (probabilities must lie in (0, 1])")
        if rows and float(logp.max()) > 0:
            raise BadReply(f"a probability exceeds 1 (log-probability {float(logp.max()):.3g} > 0)")
        mass = logp.exp().sum(dim=1, keepdim=True)  # (P, 1) quantised values may sum a little over 1
        return TopK(ids, logp - mass.clamp(min=1.0).log())  # such rows rescaled to sum to 1, others kept

    def final_adapters(self, state: ServerState) -> dict[str, Params]:
        """The global adapter, or (logits downlink) each simulated client's own, as the runtime kept them."""
        if self.s.downlink == "adapter":
            return {"": state.params}
        return {f"client-{c}": st["kd"] for c, st in sorted(state.clients.items()) if "kd" in st}

    def info(self) -> dict[str, Any]:
        return {
            "kd_downlink": self.s.downlink,
            "public_examples": len(self.public),
            "public_source": self.public.source,
        }

    def evaluate(self, r: int, state: ServerState, per_client: bool) -> Conversation[dict]:
        s, out = self.s, {}
        clients = range(s.num_clients)
        if s.downlink == "adapter":
            if self.evaluate_adapter is not None:
                out.update(self.evaluate_adapter(state.params, r))
            gen = rng.torch_generator(rng.EVAL_DOWNLINK, s.seed, r)
            wire = self.downlink.encode(state.params, {}, gen)[0] if per_client else {}
        else:  # no global model: every client evaluates its own adapter on the federation's eval set
            replies = yield eval_exchange(dict.fromkeys(clients, EvalRequest(r, split="eval")), r)
            per = {c: m for c, m in sorted(replies.accepted.items()) if m}
            if per:
                for key in ("loss", "accuracy"):
                    values = [m[key] for m in per.values() if key in m]
                    if values:
                        out[f"eval_{key}"] = sum(values) / len(values)
                if "eval_loss" in out:
                    out["eval_ppl"] = math.exp(min(out["eval_loss"], 50.0))
                out.update(summarise(per, "eval_clients_"))
                out["eval_by_client"] = {str(c): m for c, m in per.items()}
            wire = {}
        if per_client:
            replies = yield eval_exchange(shared(dict.fromkeys(clients, wire), lambda w: EvalRequest(r, params=w)), r)
            out.update(client_record(replies.accepted, "client_eval"))
        return out


def _round_metrics(used: list[Scores], agreed: TopK) -> dict[str, Any]:
    distill = [u.distill_loss for u in used if u.distill_loss is not None]
    top1 = torch.stack([u.top.ids[:, 0] for u in used])  # (n, P)
    return {
        "train_loss": sum(u.train_loss for u in used) / len(used),
        "distill_loss": sum(distill) / len(distill) if distill else None,
        "local_train_s": sum(u.local_train_s for u in used),
        "local_steps": sum(u.steps for u in used),
        **cost_metrics([u.peak_bytes for u in used], [u.flops for u in used], [u.tokens for u in used]),
        "kd_positions": int(agreed.ids.shape[0]),
        "kd_top1_agreement": float((top1 == top1[0]).all(dim=0).float().mean()) if top1.shape[1] else None,
        "kd_consensus_top1": float(agreed.logp[:, 0].exp().mean()) if agreed.ids.shape[0] else None,
    }
