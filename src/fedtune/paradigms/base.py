"""The paradigm seam: what the server sends each round, how replies are read, what a client does.

A paradigm is two halves. The server half drives each round as a short conversation: a generator
that yields ``Exchange``s (one message to each of some clients, and how to read a reply) and gets
``Replies`` back; when it returns, it hands back the new server state and the round's metrics.
Parameter sharing and KD use one exchange per round; split learning uses several. In terms of the
sketch this grew from: the messages of an exchange are ``requests``, ``Exchange.read`` is ``check``
(it raises ``BadReply`` with the reason), and the code after the ``yield`` is ``absorb``.

The client half serves the requests of its paradigm: ``serve(client, request, state) -> (reply,
state)``, where ``state`` is the client's persistent state with one namespace per owner.

What every server half does with a reply lives here once: decode a part or drop the client
(``decode_or_drop``), weigh it or drop it (``weight_or_drop``), check an update against what it
updates (``check_update``), the round and status of a reply (``check_answered``), and plausible
numbers and costs (``check_numbers``, ``check_cost``).

The round loop (``server/round_loop.py``) owns everything the paradigms share: sampling, encoding
and byte counts, transport through the runtime, deadlines, reply identity, turning any failure to
read a reply into "client dropped for the round, with the reason", the quorum, evaluation
scheduling, checkpoints and the metrics line.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

import torch

from fedtune.aggregation.clipping import fused_norm, nonfinite_tensors
from fedtune.aggregation.weighting import WeightCap, client_weight
from fedtune.client.schedule import UpdateBound
from fedtune.core.types import ClientState, Params, ServerState
from fedtune.wire.link import Link
from fedtune.wire.messages import Message

T = TypeVar("T")


class EvaluateAdapter(Protocol):
    """Held-out metrics of a global adapter after round ``r`` on the server's eval set (and its tasks);
    ``on``: the adapter model to evaluate it on (an ``AdapterModel`` other than the server's: offsite-tuning's
    emulator), on the eval set alone; default the server's base model with its adapter."""

    def __call__(self, params: Params, r: int, on: Any = None) -> dict[str, Any]: ...


Signature = dict[str, tuple[torch.Size, torch.dtype]]  # name -> (shape, dtype): what an update must look like
__all__ = [
    "BadReply",
    "ClientParadigm",
    "Conversation",
    "EvaluateAdapter",
    "Exchange",
    "Replies",
    "ServerParadigm",
    "check_answered",
    "check_cost",
    "check_numbers",
    "check_update",
    "converse",
    "cost_metrics",
    "decode_or_drop",
    "shared",
    "signature",
    "update_problem",
    "weight_or_drop",
]


class BadReply(Exception):
    """A reply that cannot be used; the message is the reason logged for dropping its client."""


@dataclass(frozen=True)
class Exchange:
    """One request to each of some clients, and how to read each reply.

    ``purpose``: "train" replies count toward the round's quorum (``federation.min_clients``), its
    dropped clients and its ``bytes_up``/``bytes_down``; "eval" replies are measured on their own and
    a failed one costs only that client's metrics. Clients given the same message object share one
    encoded payload. ``read(client, reply)`` returns what the paradigm needs from a reply, or raises
    ``BadReply``; it runs only on replies of the expected message class (``reply``: one class, or a
    tuple of the classes that may come back, e.g. split learning's) from addressed clients.
    ``max_reply_bytes``: the largest reply an honest client can send (``wire.link.max_wire_bytes`` of
    what it carries); a larger one is dropped before it is parsed.
    """

    purpose: Literal["train", "eval"]
    messages: Mapping[int, Message]
    reply: type | tuple[type, ...]
    read: Callable[[int, Any], Any]
    max_reply_bytes: int


@dataclass(frozen=True)
class Replies:
    """What came back from one exchange: read replies by client, and why the others were dropped."""

    accepted: dict[int, Any]
    dropped: dict[int, str]


Conversation = Generator[Exchange, Replies, T]


class ServerParadigm(Protocol):
    name: str

    def initial_state(self) -> ServerState:
        """The state before round 1 (round 0): global adapter (if any) and algorithm state."""
        ...

    def round(self, r: int, state: ServerState, clients: list[int]) -> Conversation[tuple[ServerState, dict]]:
        """Round ``r`` with the sampled ``clients``; returns the new state and the round's metrics."""
        ...

    def evaluate(self, r: int, state: ServerState, per_client: bool) -> Conversation[dict]:
        """Held-out metrics of the federation's model(s) after round ``r`` (``eval_loss`` etc.)."""
        ...

    def final_adapters(self, state: ServerState) -> dict[str, Params]:
        """What a finished run exports: {"": the global adapter}, or one adapter per name (e.g. per client)."""
        ...

    def info(self) -> dict[str, Any]:
        """Facts about the setup for summary.json (e.g. the public set's size and source)."""
        ...


class ClientParadigm(Protocol):
    """A paradigm's client half: serves the requests of its conversations.

    One may also offer ``serve_many([(client id, request, state), ...]) -> [(reply, state), ...]``, to
    serve several clients' requests in one go (parameter sharing's joint training)."""

    serves: tuple[type, ...]  # the request message classes this client half accepts

    def serve(self, client_id: int, request: Any, state: ClientState) -> tuple[Message, ClientState]:
        """Serve one request as ``client_id``; ``state`` is that client's persistent state, returned updated."""
        ...


# ---- reading replies: each failure is a BadReply whose message is the reason the client is dropped

DECODE_ERRORS = (ValueError, KeyError, RuntimeError, TypeError, IndexError)  # what a crafted meta or part raises


def decode_or_drop(
    link: Link, wire: Params, names: Iterable[str] | Params, what: str, max_numel: int | None = None
) -> Params:
    """``link.decode`` of a reply's part, or BadReply saying it cannot be decoded (``what``: which part)."""
    try:
        return link.decode(wire, names, max_numel=max_numel)
    except DECODE_ERRORS as exc:
        raise BadReply(f"cannot decode {what} with codecs {link.describe()!r}: {exc}") from None


def weight_or_drop(num_examples: int, num_tokens: int, scheme: str, cap: WeightCap | None, who: str) -> float:
    """A client's aggregation weight from what it reports (``aggregation.weighting``), or BadReply."""
    try:
        return client_weight(num_examples, num_tokens, scheme, cap, who)
    except ValueError as exc:
        raise BadReply(str(exc)) from None


def check_answered(reply: Any, r: int) -> None:
    """BadReply unless ``reply`` answers round ``r`` and reports success (``status`` "ok", else its error)."""
    if reply.round != r:
        raise BadReply(f"stale reply for round {reply.round}")
    if getattr(reply, "status", "ok") != "ok":
        raise BadReply(f"{reply.status}: {reply.error}")


def signature(params: Params) -> Signature:
    """What an update to ``params`` must look like; worked out once a round, not once a reply."""
    return {k: (v.shape, v.dtype) for k, v in params.items()}


def update_problem(
    delta: Params, params: Params, max_norm: float | None = None, expected: Signature | None = None
) -> str | None:
    """None if the update fits ``params`` (keys, shapes, dtypes, finite, norm bound), else the reason.
    ``expected``: ``signature(params)``, when the caller has it already."""
    if delta.keys() != params.keys():
        missing, extra = sorted(params.keys() - delta.keys()), sorted(delta.keys() - params.keys())
        return f"keys differ from the global adapter (missing {missing[:2]}, unexpected {extra[:2]})"
    if {k: (v.shape, v.dtype) for k, v in delta.items()} != (signature(params) if expected is None else expected):
        for k, v in delta.items():  # which one
            if v.shape != params[k].shape:
                return f"{k}: shape {tuple(v.shape)}, expected {tuple(params[k].shape)}"
            if v.dtype != params[k].dtype:
                return f"{k}: dtype {v.dtype}, expected {params[k].dtype}"
    norm = fused_norm(delta)  # one pass gives both: a NaN or Inf anywhere makes it non-finite
    if not math.isfinite(norm):
        bad = nonfinite_tensors(delta)
        if bad:
            return f"{bad[0]}: contains NaN or Inf"
        norm = math.inf  # finite values whose squares overflow float32
    if max_norm is not None and norm > max_norm:
        return f"update norm {norm:.4g} exceeds aggregation.max_update_norm={max_norm:g}"
    return None


def check_update(
    delta: Params, params: Params, max_norm: float | None = None, expected: Signature | None = None, what: str = ""
) -> None:
    """BadReply unless the update fits ``params`` (``update_problem``); ``what`` prefixes the reason."""
    problem = update_problem(delta, params, max_norm, expected)
    if problem:
        raise BadReply(f"{what}{problem}")


def update_limit(bound: float | UpdateBound | None, r: int, params: Params) -> float | None:
    """The bound on an update's L2 norm in round ``r`` of ``params`` as they start the round: a number as
    configured, or (``aggregation.max_update_norm: auto``) what honest training can move them."""
    if isinstance(bound, UpdateBound):
        return bound.on(r, params)
    return bound


LARGEST_REPORTED = 1e12  # a loss, a number of seconds or of steps beyond this is not a measurement


def check_numbers(**values: float | None) -> None:
    """BadReply unless every reported number lies in [0, 1e12] (None allowed): a reply's losses, times
    and counts reach the metrics and their sums, so they are checked like its tensors."""
    for name, v in values.items():
        if v is not None and not (math.isfinite(v) and 0 <= v <= LARGEST_REPORTED):
            raise BadReply(f"{name}={v!r} must be a number in [0, {LARGEST_REPORTED:g}]")


MOST_BYTES, MOST_FLOPS = 2**50, 1e24  # a client's reported peak memory and round FLOPs beyond these are not real


def check_cost(peak_bytes: int, flops: float, tokens: int = 0) -> None:
    """BadReply unless a reply's cost (``client.cost``: peak bytes, FLOPs, input tokens trained) is a
    plausible measurement."""
    for name, count in (("peak_bytes", peak_bytes), ("trained_tokens", tokens)):
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MOST_BYTES:
            raise BadReply(f"{name}={count!r} must be an integer in [0, 2^50]")
    if not (math.isfinite(flops) and 0 <= flops <= MOST_FLOPS):
        raise BadReply(f"flops={flops!r} must be a number in [0, {MOST_FLOPS:g}]")


def cost_metrics(peak_bytes: list[int], flops: list[float], tokens: list[int]) -> dict[str, float]:
    """A round's client cost for metrics.jsonl: the largest client's peak memory, and FLOPs and input tokens
    trained summed over clients (the round loop turns tokens into ``train_tokens_per_s``)."""
    return {
        "client_peak_bytes": max(peak_bytes, default=0),
        "client_flops": float(sum(flops)),
        "train_tokens": int(sum(tokens)),
    }


def shared(parts: dict[int, Any], make: Callable[[Any], Any]) -> dict[int, Any]:
    """``make`` each distinct object once, in client order: clients that share a view share the result."""
    cache: dict[int, Any] = {}
    for c in sorted(parts):
        if id(parts[c]) not in cache:
            cache[id(parts[c])] = make(parts[c])
    return {c: cache[id(parts[c])] for c in parts}


def converse(conversation: Conversation[T], exchange: Callable[[Exchange], Replies]) -> T:
    """Run a conversation to its end, carrying each exchange with ``exchange``; its return value."""
    try:
        step = next(conversation)
        while True:
            step = conversation.send(exchange(step))
    except StopIteration as done:
        return done.value
