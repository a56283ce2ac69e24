"""FedKSeed, server side: send each client the global steps it lacks, read its steps, aggregate them.

The global weights move only by steps: after round r they are the initial adapter moved by the
aggregated steps of rounds 1..r, applied in order (``zeroth_order.replay_``), so a client rebuilds them
from the steps alone and checks the result against the digest the request carries. A round's global
steps are, per candidate index j used by any client, a_j = Σ_i w_i a_ij over the round's clients with
their FedAvg weights w_i (Σ w_i = 1): the same move as averaging the clients' updates, since each
update is Σ_j a_ij z_j. Each reply is checked before it counts: its indices strictly increasing within
[0, K), no more than the steps a client can take, every amount finite and at most what clipped steps
can add up to (Σ_t η_t · zo_clip), its numbers plausible.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch

from fedtune.aggregation.weighting import WeightCap
from fedtune.client.schedule import RoundSchedule
from fedtune.client.zeroth_order import replay_
from fedtune.core.types import Params, ServerState
from fedtune.paradigms.base import (
    BadReply,
    Conversation,
    Exchange,
    check_cost,
    check_numbers,
    cost_metrics,
    shared,
    weight_or_drop,
)
from fedtune.paradigms.fedkseed.messages import KSeedReply, KSeedRequest
from fedtune.paradigms.fedkseed.steps import digest, ordered, pairs
from fedtune.wire.link import max_wire_bytes


class KSeedState(NamedTuple):
    """Every round's global steps (``counts`` per round 1..r, then their pairs in order) and, per client, the
    round whose weights the server last knew it to hold."""

    counts: torch.Tensor  # (r,) int32
    index: torch.Tensor  # (Σ counts,) int32
    amount: torch.Tensor  # (Σ counts,) float32
    held: torch.Tensor  # (num_clients,) int32


@dataclass(frozen=True)
class KSeedSettings:
    num_clients: int
    weighting: str
    weight_cap: WeightCap | None
    schedule: RoundSchedule  # the clients' steps and learning rates: the most a reply may claim
    clip: float | None  # training.zo_clip: the most |g| of a step that counts


class FedKSeed:
    name = "fedkseed"

    def __init__(self, initial: Params, candidates: list[int], settings: KSeedSettings, evaluate_adapter):
        self.initial, self.candidates, self.settings = initial, candidates, settings
        self.evaluate_adapter = evaluate_adapter

    def initial_state(self) -> ServerState:
        none_i, none_f = torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.float32)
        held = torch.zeros(self.settings.num_clients, dtype=torch.int32)
        params = {k: v.detach().clone() for k, v in self.initial.items()}
        return ServerState(0, params, KSeedState(none_i, none_i.clone(), none_f, held))

    def _request(self, r: int, st: KSeedState, since: int, target: str) -> KSeedRequest:
        """The steps of rounds since+1 .. r-1, to reach ``target``."""
        start = int(st.counts[:since].sum()) if since else 0
        counts = st.counts[since : r - 1].clone()
        stop = start + int(counts.sum())
        return KSeedRequest(r, since, target, counts, st.index[start:stop].clone(), st.amount[start:stop].clone())

    def _most_steps(self, r: int) -> tuple[int, float]:
        """(the most steps a client can take in round r, the most |amount| its steps can add to one index)."""
        s = self.settings
        steps = s.schedule.steps(s.weight_cap.max_examples if s.weight_cap else 10**6)
        clip = s.clip if s.clip is not None else float("inf")
        return steps, 1.05 * s.schedule.lr_sum(r, steps) * clip

    def round(self, r: int, state: ServerState, clients: list[int]) -> Conversation[tuple[ServerState, dict]]:
        st: KSeedState = state.algorithm
        target = digest(state.params)
        k = len(self.candidates)
        most_steps, most_amount = self._most_steps(r)
        s = self.settings
        weight: dict[int, float] = {}  # each accepted train reply's FedAvg weight, as read

        def read(client_id: int, reply: KSeedReply) -> KSeedReply:
            if reply.round != r:
                raise BadReply(f"stale reply for round {reply.round}")
            if reply.status == "behind":
                if not 0 <= reply.holds < r:
                    raise BadReply(f"says it holds round {reply.holds}, not one before round {r}")
                return reply
            if reply.status != "ok":
                raise BadReply(f"{reply.status}: {reply.error}")
            index, amount = reply.index, reply.amount
            if index.dtype != torch.int32 or amount.dtype != torch.float32 or index.dim() != 1 or amount.dim() != 1:
                raise BadReply("steps must be 1-D int32 indices and float32 amounts")
            if index.numel() != amount.numel() or index.numel() > most_steps:
                raise BadReply(f"{index.numel()} indices, {amount.numel()} amounts (at most {most_steps} steps)")
            if index.numel() and (int(index[0]) < 0 or int(index[-1]) >= k or bool((index[1:] <= index[:-1]).any())):
                raise BadReply(f"indices must increase strictly within [0, {k})")
            if not bool(torch.isfinite(amount).all()) or (amount.numel() and float(amount.abs().max()) > most_amount):
                raise BadReply(f"an amount is not finite or exceeds what clipped steps can add ({most_amount:.4g})")
            check_numbers(train_loss=reply.train_loss, local_train_s=reply.local_train_s, steps=reply.steps)
            if reply.steps > most_steps:
                raise BadReply(f"steps={reply.steps} exceeds the {most_steps} a round has")
            check_cost(reply.peak_bytes, reply.flops, reply.trained_tokens)
            who = f"client {client_id}"
            weight[client_id] = weight_or_drop(reply.num_examples, reply.num_tokens, s.weighting, s.weight_cap, who)
            return reply

        cap = max_wire_bytes(2 * most_steps, 2)
        asks = shared({c: int(st.held[c]) for c in clients}, lambda since: self._request(r, st, since, target))
        first = yield Exchange("train", asks, KSeedReply, read, cap)
        ok = {c: rep for c, rep in first.accepted.items() if rep.status == "ok"}
        behind = {c: rep.holds for c, rep in first.accepted.items() if rep.status == "behind"}
        held = st.held.clone()
        if behind:

            def caught_up(client_id: int, reply: KSeedReply) -> KSeedReply:
                if read(client_id, reply).status != "ok":
                    raise BadReply("was sent every step it lacked and still cannot train")
                return reply

            again = shared(behind, lambda since: self._request(r, st, since, target))
            second = yield Exchange("train", again, KSeedReply, caught_up, cap)
            ok.update(second.accepted)
        weights = {c: weight[c] for c in ok}
        total = sum(weights.values())
        combined = torch.zeros(k, dtype=torch.float64)  # (K,) Σ_i w_i a_ij
        for c in sorted(ok):
            rep = ok[c]
            combined.index_add_(0, rep.index.long(), rep.amount.double() * (weights[c] / total))
            held[c] = r - 1  # it trained from round r - 1's weights, which its process now holds
        used = torch.nonzero(combined, as_tuple=True)[0]
        index, amount = used.to(torch.int32), combined[used].to(torch.float32)
        params = {k_: v.clone() for k_, v in state.params.items()}
        replay_(ordered(params), pairs(index, amount, self.candidates))
        new = KSeedState(
            torch.cat([st.counts, torch.tensor([index.numel()], dtype=torch.int32)]),
            torch.cat([st.index, index]),
            torch.cat([st.amount, amount]),
            held,
        )
        losses = [ok[c].train_loss for c in sorted(ok)]
        metrics: dict[str, Any] = {
            "train_loss": sum(w * x for w, x in zip([weights[c] for c in sorted(ok)], losses, strict=True)) / total
            if ok
            else float("nan"),
            "steps": sum(rep.steps for rep in ok.values()),
            "kseed_indices": int(index.numel()),
            "local_train_s": sum(rep.local_train_s for rep in ok.values()),  # summed, as every paradigm reports
            **cost_metrics(
                [rep.peak_bytes for rep in ok.values()],
                [rep.flops for rep in ok.values()],
                [rep.trained_tokens for rep in ok.values()],
            ),
        }
        if behind:
            metrics["kseed_caught_up"] = sorted(behind)
        return replace(state, params=params, algorithm=new), metrics

    def evaluate(self, r: int, state: ServerState, per_client: bool) -> Conversation[dict]:
        return self.evaluate_adapter(state.params, r) if self.evaluate_adapter is not None else {}
        yield  # a generator: the round loop drives every paradigm's evaluation the same way

    def final_adapters(self, state: ServerState) -> dict[str, Params]:
        return {"": state.params}

    def info(self) -> dict[str, Any]:
        return {"candidates": len(self.candidates)}
