"""Evaluation by clients, shared by the paradigms: the messages, the client's side, and the summary.

A client evaluates either an adapter it is sent (the global one) or, when ``params`` is empty, the
adapter it owns (KD with logits on the downlink, where there is no global adapter). It evaluates on
its own held-out share (``split="holdout"``) or on the federation's evaluation set
(``split="eval"``, which every client can build from the config, as the server does).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from fedtune.adapters.adapter_model import AdapterModel
from fedtune.client.data import EvalSettings
from fedtune.core.types import Params
from fedtune.evaluation.harness import EvalSet, evaluate
from fedtune.paradigms.base import LARGEST_REPORTED, BadReply, Exchange
from fedtune.wire.link import max_wire_bytes

# what a client may report (preference_accuracy: on preference pairs); anything else drops its reply
METRICS = ("loss", "ppl", "accuracy", "preference_accuracy")


@dataclass(frozen=True)
class EvalRequest:
    """Server -> client: evaluate these global parameters (or, if empty, your own adapter)."""

    KIND: ClassVar[str] = "evaluate"
    TENSORS: ClassVar[tuple[str, ...]] = ("params",)
    READS_ONLY: ClassVar[bool] = True  # serving it changes no client state (wire/protocol.py)
    round: int
    params: Params = field(default_factory=dict)  # wire form of the global adapter; {}: the client's own
    split: Literal["holdout", "eval"] = "holdout"


@dataclass(frozen=True)
class EvalReply:
    """Client -> server: metrics on the requested split ({} when the client has no such data)."""

    KIND: ClassVar[str] = "eval_reply"
    TENSORS: ClassVar[tuple[str, ...]] = ()
    round: int
    metrics: dict[str, float] = field(default_factory=dict)


def evaluate_on(
    adapter: AdapterModel, tokenizer: Any, data: EvalSet | None, settings: EvalSettings, r: int
) -> dict[str, float]:
    """Loss, perplexity and (if configured for round ``r``) exact-match of the adapter's current state on ``data``."""
    if data is None:
        return {}
    s = settings
    metrics = evaluate(adapter.model, tokenizer, data, s.batch_size, s.exact_at(r), s.max_new_tokens, None, prefix="")
    return {k: float(v) for k, v in metrics.items()}


def read_eval_reply(round_index: int) -> Callable[[int, EvalReply], dict[str, float]]:
    """A reader for ``EvalReply``s of this round: finite metrics of known names, or BadReply."""

    def read(client_id: int, reply: EvalReply) -> dict[str, float]:
        if reply.round != round_index:
            raise BadReply(f"stale evaluation for round {reply.round}")
        unknown = sorted(set(reply.metrics) - set(METRICS))
        if unknown:
            raise BadReply(f"unknown metrics {unknown[:3]}")
        bad = [
            k
            for k, v in reply.metrics.items()
            if not math.isfinite(v) or not 0 <= v <= LARGEST_REPORTED or (k.endswith("accuracy") and v > 1)
        ]
        if bad:
            raise BadReply(f"metrics out of range: {bad}")
        return dict(reply.metrics)

    return read


def eval_exchange(messages: dict[int, Any], round_index: int) -> Exchange:
    """One evaluation request to each client (``EvalRequest``, or a paradigm's own), each read as an ``EvalReply``."""
    return Exchange("eval", messages, EvalReply, read_eval_reply(round_index), max_wire_bytes(0, 0))


def client_record(accepted: dict[int, dict[str, float]], prefix: str) -> dict[str, Any]:
    """An evaluation exchange's accepted replies as a round's record: ``{prefix}`` (each client's metrics, by
    client id; clients without the data left out) and ``summarise``'s mean and worst."""
    per = {c: m for c, m in sorted(accepted.items()) if m}
    return {prefix: {str(c): m for c, m in per.items()}, **summarise(per, f"{prefix}_")}


def summarise(per_client: dict[int, dict[str, float]], prefix: str) -> dict[str, Any]:
    """Mean and worst over clients: ``{prefix}loss_mean``, ``{prefix}loss_worst``, the same for the accuracies."""
    out: dict[str, Any] = {}
    for key, worst in (
        ("loss", max),
        ("accuracy", min),
        ("preference_accuracy", min),
    ):  # worst: highest loss, lowest accuracy
        values = [m[key] for m in per_client.values() if key in m]
        if values:
            out[f"{prefix}{key}_mean"] = sum(values) / len(values)
            out[f"{prefix}{key}_worst"] = worst(values)
    return out
