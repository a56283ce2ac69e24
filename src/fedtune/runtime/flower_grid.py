"""The round loop's runtime in deployment: fedtune envelopes to Flower messages on a Grid, and back.

Clients are known by the names they were enrolled under (their key's file name); the coordinator
maps those names to fedtune client ids in natural order, and to Flower node ids by asking the
SuperLink who is online. A client that is offline, crashes, or misses the round deadline is
logged with the reason on the coordinator and counts as dropped for that round only.

Transport trouble does not end a run. Every Grid call is retried on transient errors (an HTTP 5xx,
408 or 429, a refused or broken connection, an object the SuperLink did not store) with exponential
backoff and jitter, never past the round's deadline; Flower's own per-request retries are widened to
a 500 (SQLite's "database is locked" on a busy SuperLink) for up to ``REQUEST_RETRY_S`` a request.
A call that still fails costs the clients it concerned their reply, for that round. A payload
larger than one piece (``flower_wire.PIECE_BYTES``) goes as several Flower messages, both ways,
with up to ``window`` of them in flight per client (see ``flower_wire`` for the exchange).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import random
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import httpx
from flwr.app import Message
from flwr.serverapp import Grid

from fedtune.core.errors import RunError, untrusted_text
from fedtune.core.types import ClientState, Envelope
from fedtune.runtime import flower_wire as wire
from fedtune.runtime.base import PLAIN, Delivery
from fedtune.runtime.flower_wire import MESSAGE_TYPE, pack, unpack
from fedtune.runtime.polling import OBJECT_WAIT_S, Poll

try:  # raised when the SuperLink did not store a pushed object (Flower never retries it)
    from flwr.supercore.inflatable.inflatable_utils import ObjectPushError
except ImportError:  # pragma: no cover - another Flower layout: no such error to recognise
    ObjectPushError = None  # type: ignore[assignment,misc]

log = logging.getLogger("fedtune")
T = TypeVar("T")

REQUEST_RETRY_S = 30.0  # Flower retries one Runtime API request (now a 500 too) for at most this long
RETRY_S_WITHOUT_DEADLINE = 600.0  # how long a Grid call is retried when the exchange has no deadline
HELLO_TIMEOUT_S = 60.0  # insecure mode: how long clients have to say their names
RETRY_STATUS = frozenset({408, 429})  # 4xx worth another try; every 5xx is too
_unwidened_logged = False
_unquickened_logged = False


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is transport trouble that another try may not meet: an HTTP 5xx, 408 or 429, a
    refused, broken or timed-out connection (not a TLS failure), or an object the SuperLink did not store."""
    if isinstance(exc, httpx.HTTPStatusError):
        code = exc.response.status_code
        return code >= 500 or code in RETRY_STATUS
    if isinstance(exc, httpx.TransportError):
        text = str(exc).lower()
        return not isinstance(exc, httpx.UnsupportedProtocol) and not any(w in text for w in ("certificate", "ssl"))
    return ObjectPushError is not None and isinstance(exc, ObjectPushError)


def widen_flower_retries(grid: Grid, budget_s: float = REQUEST_RETRY_S) -> bool:
    """Make the Grid's own per-request retries take a 500 too (Flower retries only 502-504 and connection
    errors, for ever), all of them for at most ``budget_s`` a request. Covers every request the ServerApp
    process sends through the Grid's client, heartbeats included. False (said once) if the Grid has none."""
    global _unwidened_logged
    invoker = getattr(grid, "_retry_invoker", None)
    if invoker is None or not all(hasattr(invoker, a) for a in ("should_giveup", "max_time")):
        if not _unwidened_logged:
            log.info("this Grid (%s) has no retry invoker to widen: only fedtune's retries apply", type(grid).__name__)
            _unwidened_logged = True
        return False
    if getattr(invoker, "_fedtune_widened", False):
        return True
    flower_says = invoker.should_giveup

    def should_giveup(exc: Exception) -> bool:
        if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == 500:
            return False
        return bool(flower_says(exc)) if flower_says is not None else False

    invoker.should_giveup = should_giveup
    invoker.max_time = budget_s if invoker.max_time is None else min(invoker.max_time, budget_s)
    invoker._fedtune_widened = True
    return True


def quicken_object_pulls(first_s: float = OBJECT_WAIT_S[0], cap_s: float = OBJECT_WAIT_S[1]) -> bool:
    """Make the Grid's pulls wait ``first_s`` (doubling up to ``cap_s``) for a part of a reply not yet on the
    SuperLink: a reply is listed as soon as its sender announces it, before its content arrives, and Flower
    waits 1 s, then 2, 4, ... for that content, which put a second into most exchanges. False (said once)
    where this Flower's Grid module has no such function to set."""
    global _unquickened_logged
    from flwr.superlink.grid import http_grid

    pull = getattr(http_grid, "pull_objects", None)
    if pull is None:
        if not _unquickened_logged:
            log.info("this Flower's HttpGrid pulls objects its own way: Flower's waits for late content apply")
            _unquickened_logged = True
        return False
    if not getattr(pull, "_fedtune_quick", False):
        quick = functools.partial(pull, initial_backoff=first_s, backoff_cap=cap_s)
        quick._fedtune_quick = True  # type: ignore[attr-defined]
        http_grid.pull_objects = quick
    return True


def _costs_only_clients(exc: BaseException) -> bool:
    """Whether a Grid call that failed with ``exc`` (after its retries) costs only the clients it concerned:
    transport trouble, or the SuperLink refusing the call (an HTTP error). Anything else is raised."""
    return is_transient(exc) or isinstance(exc, httpx.HTTPStatusError)


def brief(exc: BaseException) -> str:
    """A transport error in a line: the HTTP status, or the exception's (untrusted) text."""
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code}"
    return untrusted_text(f"{type(exc).__name__}: {exc}")[:200]


@dataclass(eq=False)
class _Exchange:
    """One client's request and reply in one send_and_receive: what was sent, is in flight, came back."""

    client_id: int
    node_id: int
    meta: dict[str, int | str]  # beside every message of the exchange
    payload: bytes | None  # the request; let go once every piece of it is pushed (None)
    size: int  # the request's bytes
    count: int  # request pieces
    sha256: str | None  # of the payload, when it goes in pieces
    reply_cap: int  # the largest reply total accepted
    group: str
    sent: int = 0  # request pieces built
    delivered: int = 0  # request pieces the SuperLink took
    fetched: int = 1  # the next reply piece to ask for
    in_flight: int = 0
    reply: wire.Assembly | None = None  # a reply coming in pieces
    result: bytes | None = None
    result_meta: dict = field(default_factory=dict)
    failed: str | None = None

    @property
    def done(self) -> bool:
        return self.result is not None or self.failed is not None

    def next_steps(self, window: int) -> list[tuple[str, int]]:
        """(kind, index) of the messages to push now: request pieces, then reply fetches, ``window`` in flight."""
        steps: list[tuple[str, int]] = []
        while not self.done and self.in_flight + len(steps) < window:
            if self.reply is None and self.sent < self.count:
                steps.append(("request", self.sent))
                self.sent += 1
            elif self.reply is not None and self.fetched < self.reply.count:
                steps.append(("fetch", self.fetched))
                self.fetched += 1
            else:
                break
        return steps


@dataclass(eq=False)
class _InFlight:
    exchange: _Exchange
    kind: str  # "request" (a request piece or the whole request) or "fetch"
    index: int


class FlowerRuntime:
    """Envelopes as Flower messages on a Grid. ``piece_bytes`` (default: ``flower_wire.default_piece_bytes``)
    bounds every message; ``max_reply_bytes`` caps a pieced reply (default: 16 x its request + 64 MiB)."""

    def __init__(
        self,
        grid: Grid,
        names: Sequence[str],
        round_timeout_s: float | None = None,
        poll_s: float = 0.02,
        insecure: bool = False,
        *,
        piece_bytes: int | None = None,
        window: int = 2,
        max_reply_bytes: int | None = None,
        backoff_s: float = 0.5,
        max_backoff_s: float = 10.0,
        run_id: str | None = None,
    ):
        """``run_id``: the run, as clients key their state (``flower_wire.new_run_id``; the same when resumed)."""
        self.grid, self.names = grid, list(names)
        self.run_id = wire.checked_run(run_id) if run_id is not None else wire.new_run_id()
        self.timeout, self.poll, self.insecure = round_timeout_s, Poll.up_to(poll_s), insecure
        self.piece_bytes = wire.default_piece_bytes() if piece_bytes is None else wire.checked_piece_bytes(piece_bytes)
        self.window, self.max_reply_bytes = max(1, window), max_reply_bytes
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.sent = 0
        self.token = secrets.token_hex(4)  # exchange ids differ between runs and resumed runs
        self.self_named: dict[int, str] = {}  # insecure mode: node id -> the name the client gave
        widen_flower_retries(grid)
        quicken_object_pulls()

    def online(self, deadline: float | None = None) -> dict[str, int]:
        """Enrolled name -> Flower node id, for clients online now ({} if the SuperLink cannot say)."""
        try:
            found = self._retry("get_nodes", lambda: list(self.grid.get_nodes()), deadline)
        except Exception as exc:
            if not _costs_only_clients(exc):
                raise
            log.warning("could not ask the SuperLink who is online (%s): no client counts as online", brief(exc))
            return {}
        nodes = {n.node_id: n.name for n in found}
        if self.insecure:  # nobody enrolled: clients name themselves (only their word for it)
            unknown = [i for i in nodes if i not in self.self_named]
            if unknown:
                self.self_named.update(self._ask_names(unknown))
            nodes = {i: self.self_named.get(i, "") for i in nodes}
        return {name: i for i, name in nodes.items() if name in self.names}

    def _ask_names(self, node_ids: list[int]) -> dict[int, str]:
        asked = [_Exchange(-1, i, {"hello": 1}, b"", 0, 1, None, 0, "hello") for i in node_ids]
        self._run(asked, time.monotonic() + HELLO_TIMEOUT_S, HELLO_TIMEOUT_S)
        names = {}
        for x in asked:
            try:
                if x.failed is not None:
                    raise ValueError(x.failed)
                names[x.node_id] = str(x.result_meta["name"])[:200]
            except Exception as exc:  # insecure mode: anyone may answer; a malformed answer names nobody
                log.warning("node %s did not say its name (%s)", x.node_id, untrusted_text(str(exc)))
        return names

    def wait_for_clients(self, wanted: int, needed: int, timeout_s: float) -> dict[str, int]:
        """Wait until ``wanted`` clients are online; after timeout_s, go on with ``needed``, else RunError."""
        deadline, shown = time.monotonic() + timeout_s, -1
        while True:
            online = self.online(deadline)
            missing = ", ".join(sorted(set(self.names) - set(online))) or "none"
            if len(online) >= wanted or (time.monotonic() > deadline and len(online) >= needed):
                log.info("%d of %d clients online (missing: %s)", len(online), len(self.names), missing)
                return online
            if time.monotonic() > deadline:
                raise RunError(
                    f"only {len(online)} of {len(self.names)} clients came online within {timeout_s:.0f}s "
                    f"(runtime.flower.join_timeout_s) and federation.min_clients={needed}; missing: {missing}. "
                    "Start them with `fedtune client CONFIG --data PATH --key KEY`"
                )
            if len(online) != shown:
                log.info("waiting for clients: %d of %d online (missing: %s)", len(online), wanted, missing)
                shown = len(online)
            time.sleep(1.0)

    def send_and_receive(self, envelopes: Sequence[Envelope], delivery: Delivery = PLAIN) -> list[Envelope]:
        """The replies to ``envelopes``. The round deadline counts from ``delivery.round_started`` (default:
        now), so it covers a client's whole round conversation; a reply over ``delivery.max_reply_bytes`` (and
        the runtime's own cap) is refused, whole or in pieces, before it is put together; with
        ``delivery.release``, each request is let go once the SuperLink has all of it."""
        started = time.monotonic() if delivery.round_started is None else delivery.round_started
        deadline = None if self.timeout is None else started + self.timeout
        online = self.online(deadline)
        self.sent += 1
        exchanges, digests = [], {}
        taken = list(envelopes)
        if delivery.release and isinstance(envelopes, list):  # handed over: each request is let go once delivered
            envelopes.clear()
        for e in taken:
            name = self.names[e.client_id]
            if name not in online:
                log.warning("client %d (%s) is offline; it misses this exchange", e.client_id, name)
                continue
            count = wire.piece_count(len(e.payload), self.piece_bytes)
            if count > 1 and id(e.payload) not in digests:  # clients sent the same message share its hash
                digests[id(e.payload)] = hashlib.sha256(e.payload).hexdigest()
            meta = {wire.CLIENT: e.client_id, wire.EXCHANGE: f"{self.token}.{self.sent}.{e.client_id}"}
            meta[wire.RUN] = self.run_id
            meta[wire.PIECE_SIZE] = self.piece_bytes
            cap = self.max_reply_bytes if self.max_reply_bytes is not None else 16 * len(e.payload) + 64 * 2**20
            cap = cap if delivery.max_reply_bytes is None else min(cap, delivery.max_reply_bytes)
            sha = digests.get(id(e.payload)) if count > 1 else None
            size = len(e.payload)
            exchanges.append(
                _Exchange(e.client_id, online[name], meta, e.payload, size, count, sha, cap, str(self.sent))
            )
        del taken, e  # the exchanges hold the requests now, until each one is delivered
        self._run(exchanges, deadline, self.timeout)
        out = []
        for x in exchanges:  # who replied is the client the request went to, not what the reply says
            if x.result is None:
                log.warning("client %d (%s): %s", x.client_id, self.names[x.client_id], untrusted_text(str(x.failed)))
            else:
                out.append(Envelope(x.client_id, x.result))
        return out

    def _run(self, exchanges: list[_Exchange], deadline: float | None, timeout: float | None) -> None:
        """Push and pull until every exchange has its reply or failed (a reason), or the deadline passes.

        A reply counts only if it comes from the node its message went to, and only once.
        """
        pending: dict[str, _InFlight] = {}
        self._push_next(exchanges, pending, deadline)
        self.poll.got()  # replies follow soon after requests: ask early, then less often
        while pending:
            replies = self._pull(pending, deadline)
            got = len(replies)
            while replies:  # each reply (up to a piece) is let go once taken, before more pieces are built
                self._receive(replies.pop(), pending)
            over = [i for i, s in pending.items() if s.exchange.done]  # late answers are not waited for
            for msg_id in over:
                del pending[msg_id]
            self._release(over)
            self._push_next(exchanges, pending, deadline)
            if pending and deadline is not None and time.monotonic() > deadline:
                for x in exchanges:
                    if not x.done:
                        x.failed = f"missed the {timeout:.0f}s round deadline"
                self._release(list(pending))
                return
            if got:
                self.poll.got()
            elif pending:
                self._wait()
        for x in exchanges:
            if not x.done:
                x.failed = "no reply"

    def _wait(self) -> None:
        """Until it is time to ask again: on a grid with a direct channel, until a reply comes over it."""
        wait = getattr(self.grid, "wait", None)
        (wait or time.sleep)(self.poll.next())

    def _release(self, ids: list[str]) -> None:
        """Tell a grid that keeps messages until their replies (the direct channel's) that these are over."""
        release = getattr(self.grid, "release", None)
        if release is not None and ids:
            release(ids)

    def _receive(self, reply: Message, pending: dict[str, _InFlight]) -> None:
        step = pending.pop(reply.metadata.reply_to_message_id, None)
        if step is None or reply.metadata.src_node_id != step.exchange.node_id:
            log.warning("ignored a reply from node %s to a message it was not sent", reply.metadata.src_node_id)
            return
        x = step.exchange
        x.in_flight -= 1
        if not x.done:
            try:
                self._take(x, step, reply)
            except ValueError as exc:  # a reply is untrusted: one that breaks the protocol costs its client
                x.failed = str(exc)

    def _take(self, x: _Exchange, step: _InFlight, reply: Message) -> None:
        """Apply one answer to its exchange; ValueError (the reason to drop the client) if it breaks the protocol."""
        if reply.has_error():
            raise ValueError(f"failed: {reply.error.reason} (Flower error {reply.error.code})")
        try:
            data, meta = unpack(reply.content)
        except Exception as exc:
            raise ValueError(f"its reply is not a fedtune message ({exc})") from None
        if step.kind == "fetch":
            assert x.reply is not None
            if meta.get(wire.PIECE) != step.index:
                raise ValueError(f"asked for reply piece {step.index}, got {str(meta.get(wire.PIECE))[:20]!r}")
            x.reply.add(step.index, data)
        elif x.reply is not None:
            return  # a request piece answered again after the reply began: nothing new
        elif wire.HAVE in meta:  # a request piece taken; the client waits for the rest
            if x.sent == x.count and x.in_flight == 0:
                raise ValueError("it took every request piece but did not reply")
            return
        elif wire.REPLY_TOTAL in meta:  # the reply's first piece
            sha = wire.checked_sha256(meta.get(wire.REPLY_SHA256))
            x.reply = wire.Assembly(meta[wire.REPLY_TOTAL], self.piece_bytes, sha, x.reply_cap)
            x.reply.add(0, data)
        else:  # the whole reply
            if len(data) > min(x.reply_cap, self.piece_bytes):
                raise ValueError(f"a reply of {len(data):,} bytes, more than the {x.reply_cap:,} it can need")
            x.result, x.result_meta = data, meta
            return
        if x.reply.complete:
            x.result, x.reply = x.reply.result(), None

    def _push_next(self, exchanges: list[_Exchange], pending: dict[str, _InFlight], deadline: float | None) -> None:
        """Push every exchange's next messages, in pushes of about one piece (each piece is built only here)."""
        group: list[tuple[_InFlight, Message]] = []
        size = 0
        for x in exchanges:
            for kind, index in x.next_steps(self.window):
                step = _InFlight(x, kind, index)
                group.append((step, self._message(step, deadline)))
                size += x.size // x.count if kind == "request" else 0
                if size >= self.piece_bytes:
                    self._push(group, pending, deadline)
                    group, size = [], 0
        if group:
            self._push(group, pending, deadline)

    def _message(self, step: _InFlight, deadline: float | None) -> Message:
        x, meta = step.exchange, dict(step.exchange.meta)
        if step.kind == "fetch":
            data, meta[wire.FETCH] = b"", step.index
        elif x.count == 1:
            assert x.payload is not None
            data = x.payload
        else:
            assert x.payload is not None
            start, end = wire.piece_span(step.index, x.size, self.piece_bytes)
            data = x.payload[start:end]
            meta.update({wire.PIECE: step.index, wire.TOTAL: x.size, wire.SHA256: str(x.sha256)})
        # a message that misses the deadline expires with it, so a client that reconnects later is not
        # handed a stale round (Flower keeps undelivered messages for 12 h by default)
        ttl = None if deadline is None else max(1.0, deadline - time.monotonic())
        content = pack(data, meta)
        return Message(content=content, dst_node_id=x.node_id, message_type=MESSAGE_TYPE, group_id=x.group, ttl=ttl)

    def _push(
        self, group: list[tuple[_InFlight, Message]], pending: dict[str, _InFlight], deadline: float | None
    ) -> None:
        """Push one group of messages (retried as a whole: the same messages, the same ids); the exchange
        of a message that cannot be delivered fails."""
        messages = [m for _, m in group]
        sent = [(step, None) for step, _ in group]
        why = "could not be delivered"
        try:
            ids = list(self._retry("push_messages", lambda: self.grid.push_messages(messages), deadline))
        except Exception as exc:
            if not _costs_only_clients(exc):
                raise
            ids, why = [], f"could not be delivered ({brief(exc)})"
        if len(ids) != len(sent):  # Flower gives [] for a push too large for one HTTP request
            ids = [""] * len(sent)
        messages.clear()  # (the pieces' bytes go as soon as the SuperLink has them)
        group.clear()
        for (step, _), msg_id in zip(sent, ids, strict=True):
            x = step.exchange
            if msg_id:
                pending[msg_id] = step
                x.in_flight += 1
                if step.kind == "request":
                    x.delivered += 1
                    if x.delivered == x.count:
                        x.payload = None  # every piece is with the SuperLink: this process's copy goes
            elif not x.done:
                x.failed = why

    def _pull(self, pending: dict[str, _InFlight], deadline: float | None) -> list[Message]:
        """The replies available now. A pull that fails part way may have taken replies with it (the
        SuperLink forgets a reply once it answers the pull): those clients then miss the deadline. A pull
        that fails until the deadline (or for RETRY_S_WITHOUT_DEADLINE) costs every waiting client its reply."""
        try:
            return list(self._retry("pull_messages", lambda: self.grid.pull_messages(list(pending)), deadline))
        except Exception as exc:
            if not _costs_only_clients(exc):
                raise
            for step in pending.values():
                if not step.exchange.done:
                    step.exchange.failed = f"its reply could not be pulled ({brief(exc)})"
            pending.clear()
            return []

    def _retry(self, what: str, call: Callable[[], T], deadline: float | None) -> T:
        """call(), again after each transient error with exponential backoff and jitter while the wait ends
        before ``deadline`` (time.monotonic(); None: RETRY_S_WITHOUT_DEADLINE from now). Other errors, and
        the last transient one, are raised."""
        limit = time.monotonic() + RETRY_S_WITHOUT_DEADLINE if deadline is None else deadline
        delay, tries = self.backoff_s, 0
        while True:
            try:
                return call()
            except Exception as exc:
                tries += 1
                wait = random.uniform(delay / 2, delay)
                if not is_transient(exc) or time.monotonic() + wait >= limit:
                    raise
                log.warning("%s failed (%s); try %d again in %.1f s", what, brief(exc), tries + 1, wait)
                time.sleep(wait)
                delay = min(2 * delay, self.max_backoff_s)

    def client_states(self) -> dict[int, ClientState]:
        return {}  # deployed clients keep their own state

    def load_client_states(self, states: dict[int, ClientState]) -> None:
        pass

    def close(self) -> None:
        pass
