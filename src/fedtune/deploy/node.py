"""The client's node loop: pull a coordinator message, answer it with the worker, push the reply, ask again soon.

One warm process does it all: the model is loaded once, the worker answers in the same process (no
local socket, no per-message process), and the next ask follows a reply within milliseconds while
a round is under way (``runtime.polling.Poll``). What a message asks is checked by the worker as
any request is; a request the worker cannot serve is answered with a Flower error naming why, so
the coordinator drops this client for that exchange instead of waiting out its deadline.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

import httpx

from fedtune.core.errors import untrusted_text
from fedtune.deploy.fleet import FleetLink, Incoming, Refused
from fedtune.runtime import flower_wire as wire
from fedtune.runtime.flower_grid import brief
from fedtune.runtime.polling import Poll

if TYPE_CHECKING:
    from fedtune.deploy.local_worker import LocalWorker

log = logging.getLogger("fedtune")

REJOIN_S = (1.0, 2.0, 5.0)  # waits before joining again after losing the coordinator (the last one repeats)


def answer(message, worker: LocalWorker, name: str):
    """The reply to one coordinator message: the worker's answer (a step of a pieced exchange when the
    message names one), or this client's name when an insecure coordinator asks who this is."""
    from flwr.app import Message

    payload, meta = wire.unpack(message.content)
    if "hello" in meta:  # insecure mode: the coordinator asks who this is
        return Message(wire.pack(b"", {"name": name}), reply_to=message)
    client_id = wire.checked_int(meta.get(wire.CLIENT), 0, 2**31 - 1, "a client id")
    if wire.EXCHANGE not in meta:
        reply = worker.serve_one(client_id, wire.checked_run(meta.get(wire.RUN)), payload)
        return Message(wire.pack(reply, {wire.CLIENT: client_id}), reply_to=message)
    if wire.FETCH in meta:
        said, data = worker.pieces.fetch(client_id, meta)
    else:
        said, data = worker.pieces.piece(client_id, meta, payload)
    return Message(wire.pack(bytes(data), {wire.CLIENT: client_id, **said}), reply_to=message)


def failure(message, exc: BaseException):
    """A Flower error reply saying why ``message`` could not be answered."""
    from flwr.app import Error, Message

    return Message(Error(code=0, reason=f"fedtune client: {type(exc).__name__}: {exc}"[:2000]), reply_to=message)


def serve(link: FleetLink, worker: LocalWorker, name: str, poll: Poll, stop: threading.Event) -> None:
    """Answer messages until ``stop``; returns on stop, raises httpx errors when the coordinator is lost."""
    while not stop.is_set():
        got = link.pull()
        if got is None:
            stop.wait(poll.next())
            continue
        _answer_one(link, got, worker, name)
        poll.got()  # the next request of a conversation follows its reply closely


def _answer_one(link: FleetLink, got: Incoming, worker: LocalWorker, name: str) -> None:
    start = time.perf_counter()
    try:
        reply = answer(got.message, worker, name)
    except Exception as exc:  # a request it cannot serve: say why, keep serving
        log.exception("could not answer the coordinator's message: %s", untrusted_text(str(exc))[:200])
        reply = failure(got.message, exc)
    link.push(reply, got.run_id, time.perf_counter() - start)


def run_node(
    link: FleetLink,
    worker: LocalWorker,
    name: str,
    poll: Poll,
    stop: threading.Event,
    refused_retry_s: float,
) -> str | None:
    """Join, serve, and join again whenever the coordinator is lost, until ``stop``: None, or why this client
    was refused for longer than ``refused_retry_s`` (a key not enrolled, or a node still listed online)."""
    refused_since = None
    lost = 0
    while not stop.is_set():
        try:
            node_id = link.activate()
        except Refused as exc:
            refused_since = refused_since or time.monotonic()
            if time.monotonic() - refused_since >= refused_retry_s:
                return str(exc)
            log.warning("the coordinator refused this client (%s); retrying", untrusted_text(str(exc))[:200])
            stop.wait(2.0)
            continue
        except httpx.HTTPError as exc:
            wait = REJOIN_S[min(lost, len(REJOIN_S) - 1)]
            lost += 1
            log.warning("cannot reach the coordinator (%s); trying again in %.0fs", brief(exc), wait)
            stop.wait(wait)
            continue
        refused_since, lost = None, 0
        log.info("connected to the coordinator as node %s", node_id)
        try:
            serve(link, worker, name, poll, stop)
        except Exception as exc:  # transport trouble, or a SuperLink that forgot this node: join again
            log.warning("lost the coordinator (%s); joining again", brief(exc))
            link.deactivate()
            stop.wait(REJOIN_S[0])
    link.deactivate()
    return None
