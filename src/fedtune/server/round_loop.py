"""The one round loop: sample, send, collect, validate, aggregate, evaluate, checkpoint.

Every runtime, aggregator and (later) paradigm plugs into this loop rather than writing its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fedtune.aggregation.base import Aggregator, Contribution
from fedtune.aggregation.weighting import client_weight
from fedtune.errors import RunError
from fedtune.reporting.console import bar_disabled
from fedtune.runtime.base import Runtime
from fedtune.server.checkpoint import ServerState, checkpoint_dir, save_checkpoint
from fedtune.server.downlink import ReplicaDownlink
from fedtune.server.sampling import sample_clients
from fedtune.server.validation import update_problem
from fedtune.types import Envelope, EvalReply, EvalRequest, Params, TrainReply, TrainRequest
from fedtune.wire.link import Link, generator
from fedtune.wire.messages import decode_message, encode_message

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopSettings:
    rounds: int
    num_clients: int
    clients_per_round: int
    min_clients: int
    seed: int
    weighting: str = "examples"
    keep_checkpoints: int | None = None
    progress: bool = True
    max_update_norm: float | None = None


def run_rounds(
    state: ServerState,
    runtime: Runtime,
    aggregator: Aggregator,
    settings: LoopSettings,
    run_dir: Path,
    evaluate_global: Callable[[Params], dict[str, Any]] | None = None,
    eval_due: Callable[[int], bool] = lambda r: False,
    per_client_eval: bool = False,
    on_record: Callable[[dict[str, Any]], None] = lambda rec: None,
    uplink: Link | None = None,
    downlink: Link | None = None,
    replicas: ReplicaDownlink | None = None,
) -> ServerState:
    """Run rounds state.round+1 .. settings.rounds; checkpoint after each; return the final state.

    ``downlink`` encodes the global adapter each client receives; ``uplink`` decodes their updates.
    With ``replicas``, clients receive the change to the adapter they hold instead (its link
    compresses it), and per-client evaluation gets the plain adapter.
    """
    uplink, downlink = uplink or Link(), downlink or Link()
    bar = tqdm(
        total=settings.rounds, initial=state.round, desc="rounds", unit="round", disable=bar_disabled(settings.progress)
    )
    for r in range(state.round + 1, settings.rounds + 1):
        start = time.perf_counter()
        clients = sample_clients(settings.num_clients, settings.clients_per_round, settings.seed, r)
        control = aggregator.broadcast(state.aggregator)  # {} unless the algorithm sends more (SCAFFOLD)
        views = {c: aggregator.client_view(state.params, state.aggregator, c) for c in clients}
        if replicas is None:
            downs = _encode_per_view(
                views, downlink, generator(settings.seed, r, 0), partial(TrainRequest, r, control=control)
            )
        else:
            wires = replicas.encode(views, generator(settings.seed, r, 0))
            make = partial(TrainRequest, r, control=control, downlink="update")
            downs = _encode_shared(wires, lambda w, make=make: encode_message(make(params=w)))
        replies = runtime.send_and_receive([Envelope(c, downs[c]) for c in clients])
        contributions, used, dropped, bytes_up = [], [], {}, 0
        for env in sorted(replies, key=lambda e: e.client_id):
            bytes_up += len(env.payload)
            reply = decode_message(env.payload)
            delta, problem = _reply_delta(reply, r, views[env.client_id], settings.max_update_norm, control, uplink)
            if problem:
                dropped[env.client_id] = problem
                log.warning("round %d: dropped client %d's update: %s", r, env.client_id, problem)
                continue
            weight = client_weight(reply, settings.weighting)
            contributions.append(Contribution(env.client_id, delta, weight, reply.control_delta))
            used.append(reply)
        for c in sorted(set(clients) - {e.client_id for e in replies}):
            dropped[c] = "no reply"
            log.warning("round %d: client %d did not reply", r, c)
        if len(contributions) < settings.min_clients:
            last = checkpoint_dir(run_dir, state.round)
            last = last if last.exists() else "none yet"
            raise RunError(
                f"round {r}: only {len(contributions)} of {len(clients)} clients returned a usable update "
                f"(federation.min_clients={settings.min_clients}): "
                + "; ".join(f"client {c}: {why}" for c, why in dropped.items())
                + f". The last good checkpoint is intact: {last}. Fix the cause, then rerun with --resume."
            )
        params, agg_state = aggregator.aggregate(state.params, contributions, state.aggregator)
        record: dict[str, Any] = {
            "round": r,
            "clients": [c.client_id for c in contributions],
            "dropped": {str(c): why for c, why in dropped.items()},
            "train_loss": _weighted_loss(used, [c.weight for c in contributions]),
            "bytes_down": sum(len(downs[c]) for c in clients),
            "bytes_up": bytes_up,
            "local_train_s": sum(u.local_train_s for u in used),
            "local_steps": sum(u.steps for u in used),
        }
        record.update(aggregator.metrics(agg_state))
        record["train_s"] = time.perf_counter() - start  # sampling .. aggregation, evaluation excluded
        if eval_due(r):
            t = time.perf_counter()
            if evaluate_global is not None:
                record.update(evaluate_global(params))
            if per_client_eval:
                views = {c: aggregator.client_view(params, agg_state, c) for c in range(settings.num_clients)}
                eval_link = downlink if replicas is None else Link()
                record.update(_per_client_eval(runtime, views, r, eval_link, generator(settings.seed, r, 1)))
            record["eval_s"] = time.perf_counter() - t
        record["wall_s"] = time.perf_counter() - start
        state = replace(
            state,
            round=r,
            params=params,
            aggregator=agg_state,
            history=[*state.history, record],
            clients=runtime.client_states(),
            replicas=dict(replicas.replicas) if replicas is not None else {},
        )
        save_checkpoint(run_dir, state, settings.keep_checkpoints)
        on_record(record)
        bar.update(1)
    bar.close()
    return state


def _reply_delta(
    reply: Any, round_index: int, params: Params, max_norm: float | None, control: Params, uplink: Link
) -> tuple[Params, str | None]:
    """(the decoded update, None) or ({}, why the reply cannot be used)."""
    if not isinstance(reply, TrainReply):
        return {}, f"expected a train reply, got {type(reply).__name__}"
    if reply.round != round_index:
        return {}, f"stale reply for round {reply.round}"
    if reply.status != "ok":
        return {}, f"{reply.status}: {reply.error}"
    if control:
        problem = update_problem(reply.control_delta, control)
        if problem:
            return {}, f"control variate: {problem}"
    try:
        delta = uplink.decode(reply.delta, params)
    except (ValueError, KeyError, RuntimeError) as exc:
        return {}, f"cannot decode the update with uplink codecs {uplink.describe()!r}: {exc}"
    problem = update_problem(delta, params, max_norm)
    return ({}, problem) if problem else (delta, None)


def _weighted_loss(replies: list[TrainReply], weights: list[float]) -> float:
    total = sum(weights)
    return sum(w * r.train_loss for r, w in zip(replies, weights, strict=True)) / total if total else float("nan")


def _encode_per_view(
    views: dict[int, Params], link: Link, gen: torch.Generator, make: Callable[..., Any]
) -> dict[int, bytes]:
    """Encode each distinct view once (all clients share one payload unless views differ, e.g. by rank)."""
    return _encode_shared(views, lambda v: encode_message(make(params=link.encode(v, {}, gen)[0])))


def _encode_shared(parts: dict[int, Params], encode: Callable[[Params], bytes]) -> dict[int, bytes]:
    """Encode each distinct object once: clients sharing a view (or a downlink update) share a payload."""
    cache: dict[int, bytes] = {}
    for p in parts.values():
        if id(p) not in cache:
            cache[id(p)] = encode(p)
    return {c: cache[id(p)] for c, p in parts.items()}


def _per_client_eval(
    runtime: Runtime, views: dict[int, Params], r: int, downlink: Link, gen: torch.Generator
) -> dict[str, Any]:
    """Every client evaluates the global model, as it receives it, on its own held-out share."""
    downs = _encode_per_view(views, downlink, gen, partial(EvalRequest, r))
    replies = runtime.send_and_receive([Envelope(c, downs[c]) for c in views])
    per_client: dict[str, dict[str, float]] = {}
    for env in sorted(replies, key=lambda e: e.client_id):
        reply = decode_message(env.payload)
        if isinstance(reply, EvalReply) and reply.metrics:
            per_client[str(env.client_id)] = reply.metrics
    out: dict[str, Any] = {"client_eval": per_client, "client_eval_bytes": sum(len(d) for d in downs.values())}
    for key, worst in (("loss", max), ("accuracy", min)):  # worst: highest loss, lowest accuracy
        values = [m[key] for m in per_client.values() if key in m]
        if values:
            out[f"client_eval_{key}_mean"] = sum(values) / len(values)
            out[f"client_eval_{key}_worst"] = worst(values)
    return out
