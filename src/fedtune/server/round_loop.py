"""The one round loop: sample, converse with the paradigm's clients, evaluate, checkpoint, record.

Every paradigm (parameter sharing, KD, split learning) and every runtime plugs into this loop. The
paradigm decides what is sent and how replies change the state (``fedtune.paradigms.base``); the
loop carries the messages and owns what all paradigms share: byte counts, reply identity, dropping
a client with the reason when its reply cannot be read or used, the quorum, evaluation,
checkpoints and the metrics record.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fedtune.aggregation.clipping import not_finite
from fedtune.core.errors import RunError, untrusted_text
from fedtune.core.types import Envelope, ServerState
from fedtune.paradigms.base import BadReply, Exchange, Replies, ServerParadigm, converse
from fedtune.reporting.console import bar_disabled
from fedtune.runtime.base import Delivery, Runtime
from fedtune.server.checkpoint import checkpoint_dir, save_checkpoint
from fedtune.server.sampling import poisson_sample, sample_clients
from fedtune.wire.messages import decode_message, encode_message

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopSettings:
    rounds: int
    num_clients: int
    clients_per_round: int
    min_clients: int
    seed: int
    keep_checkpoints: int | None = None
    progress: bool = True
    evaluate_at_start: bool = False
    per_client_eval: bool = False
    poisson: bool = False  # each client independently with probability clients_per_round / num_clients (DP)


class Network:
    """One round's exchanges: encode, send through the runtime, read replies, count bytes, drop with reasons."""

    def __init__(self, runtime: Runtime, round_index: int, sampled: list[int], min_clients: int, run_dir: Path):
        self.runtime, self.round, self.sampled, self.min_clients = runtime, round_index, sampled, min_clients
        self.run_dir = run_dir
        self.bytes = {"train": [0, 0], "eval": [0, 0]}  # purpose -> [down, up]
        self.dropped: dict[int, str] = {}  # train exchanges: client -> why it left the round
        self.eval_exchanges = 0
        self.waited = {"train": 0.0, "eval": 0.0}  # purpose -> seconds in the runtime's hands (clients' side)
        self.started = time.monotonic()  # one round deadline (a deployment's) counts from here

    def exchange(self, ex: Exchange) -> Replies:
        cache: dict[int, bytes] = {}
        for msg in ex.messages.values():
            if id(msg) not in cache:
                cache[id(msg)] = encode_message(msg)
        payloads = {c: cache[id(m)] for c, m in ex.messages.items()}
        counts = self.bytes[ex.purpose]
        counts[0] += sum(len(p) for p in payloads.values())
        self.eval_exchanges += ex.purpose == "eval"
        sent = time.perf_counter()
        outgoing = [Envelope(c, payloads[c]) for c in sorted(payloads)]
        del payloads, cache  # the runtime may let each request go once delivered (it empties ``outgoing``)
        envelopes = self.runtime.send_and_receive(outgoing, Delivery(ex.max_reply_bytes, self.started, release=True))
        self.waited[ex.purpose] += time.perf_counter() - sent
        accepted: dict[int, Any] = {}
        dropped: dict[int, str] = {}
        seen: set[int] = set()
        kinds = ex.reply if isinstance(ex.reply, tuple) else (ex.reply,)
        for env in sorted(envelopes, key=lambda e: e.client_id):
            c = env.client_id
            if c not in ex.messages or c in seen:
                why = "was not asked" if c not in ex.messages else "already replied"
                log.warning(
                    "round %d: ignored a reply that claims to be client %s's: that client %s", self.round, c, why
                )
                continue
            seen.add(c)
            counts[1] += len(env.payload)
            if len(env.payload) > ex.max_reply_bytes:
                dropped[c] = f"a reply of {len(env.payload):,} bytes, more than the {ex.max_reply_bytes:,} it can need"
                continue
            try:
                accepted[c] = ex.read(c, decode_message(env.payload, *kinds))
            except BadReply as exc:  # its text may quote the client: kept to one short line
                dropped[c] = untrusted_text(exc)
            except Exception as exc:  # a reply is untrusted input: any failure to read it drops only its client
                dropped[c] = untrusted_text(f"unreadable reply ({type(exc).__name__}: {exc})")
        for c in sorted(set(ex.messages) - seen):
            dropped[c] = "no reply"
        for c, why in dropped.items():
            log.warning("round %d: dropped client %d's %s reply: %s", self.round, c, ex.purpose, why)
        if ex.purpose == "train":
            self.dropped.update(dropped)
            self._check_quorum()
        return Replies(accepted, dropped)

    def _check_quorum(self) -> None:
        left = [c for c in self.sampled if c not in self.dropped]
        if len(left) >= self.min_clients:
            return
        last = checkpoint_dir(self.run_dir, self.round - 1)
        raise RunError(
            f"round {self.round}: only {len(left)} of {len(self.sampled)} clients returned a usable reply "
            f"(federation.min_clients={self.min_clients}): "
            + "; ".join(f"client {c}: {why}" for c, why in self.dropped.items())
            + f". The last good checkpoint is intact: {last if last.exists() else 'none yet'}. "
            "Fix the cause, then rerun with --resume."
        )


def run_rounds(
    state: ServerState,
    runtime: Runtime,
    paradigm: ServerParadigm,
    settings: LoopSettings,
    run_dir: Path,
    eval_due: Callable[[int], bool] = lambda r: False,
    on_record: Callable[[dict[str, Any]], None] = lambda rec: None,
    on_state: Callable[[ServerState], None] = lambda state: None,
) -> ServerState:
    """Run rounds state.round+1 .. settings.rounds; checkpoint after each (then ``on_state`` and ``on_record``
    see it); return the final state.

    A fresh state (round 0, no history) is first evaluated, if ``evaluate_at_start``, and checkpointed.
    """
    if state.round == 0 and not state.history:
        start = time.perf_counter()
        net = Network(runtime, 0, [], 0, run_dir)
        record: dict[str, Any] = {"round": 0}
        if settings.evaluate_at_start:
            record.update(_evaluate(paradigm, 0, state, net, per_client=False))
        record["wall_s"] = time.perf_counter() - start
        state = replace(state, history=[record])
        save_checkpoint(run_dir, state, settings.keep_checkpoints)
        on_record(record)
    bar = tqdm(
        total=settings.rounds, initial=state.round, desc="rounds", unit="round", disable=bar_disabled(settings.progress)
    )
    for r in range(state.round + 1, settings.rounds + 1):
        start = time.perf_counter()
        if settings.poisson:  # a round may sample fewer clients than the quorum, or none: they all must reply
            clients = poisson_sample(
                settings.num_clients, settings.clients_per_round / settings.num_clients, settings.seed, r
            )
            quorum = min(settings.min_clients, len(clients))
        else:
            clients = sample_clients(settings.num_clients, settings.clients_per_round, settings.seed, r)
            quorum = settings.min_clients
        net = Network(runtime, r, clients, quorum, run_dir)
        new_state, metrics = converse(paradigm.round(r, state, clients), net.exchange)
        _check_finite(r, new_state, state.round)
        record = {
            "round": r,
            "clients": [c for c in clients if c not in net.dropped],
            "dropped": {str(c): why for c, why in net.dropped.items()},
            "bytes_down": net.bytes["train"][0],
            "bytes_up": net.bytes["train"][1],
            **metrics,
        }
        record["train_s"] = time.perf_counter() - start  # sampling .. absorbing replies, evaluation excluded
        record["clients_s"] = net.waited["train"]  # of which the clients had the round (in turn, in lanes or remote)
        if record.get("train_tokens") and record["train_s"] > 0:  # throughput of the round's training, wall clock
            record["train_tokens_per_s"] = record["train_tokens"] / record["train_s"]
        if eval_due(r):
            t = time.perf_counter()
            record.update(_evaluate(paradigm, r, new_state, net, settings.per_client_eval))
            record["eval_s"] = time.perf_counter() - t
        record["wall_s"] = time.perf_counter() - start
        state = replace(new_state, round=r, history=[*state.history, record], clients=runtime.client_states())
        save_checkpoint(run_dir, state, settings.keep_checkpoints)
        on_state(state)
        on_record(record)
        bar.update(1)
    bar.close()
    return state


def _check_finite(r: int, new: ServerState, last: int) -> None:
    """RunError unless every tensor of the new global parameters is finite: finite, bounded updates can
    still sum past the float range, and a NaN model must never be applied or checkpointed."""
    bad = not_finite(new.params)
    if bad:
        raise RunError(
            f"round {r}: the new global adapter is not finite in {len(bad)} tensor(s) (e.g. {bad[0]}); it was not "
            f"applied or checkpointed, and round {last}'s checkpoint is intact. Bound the updates "
            "(aggregation.clip_norm, aggregation.max_update_norm) or lower the learning rates, then --resume"
        )


def _evaluate(paradigm: ServerParadigm, r: int, state: ServerState, net: Network, per_client: bool) -> dict[str, Any]:
    out = converse(paradigm.evaluate(r, state, per_client), net.exchange)
    if net.eval_exchanges:
        out["client_eval_bytes"] = net.bytes["eval"][0]
    return out
