"""The client's node loop: pull a coordinator message, answer it with the worker, push the reply, ask again soon.

One warm process does it all: the model is loaded once, the worker answers in the same process (no
local socket, no per-message process), and the next ask follows a reply within milliseconds while
a round is under way (``runtime.polling.Poll``). What a message asks is checked by the worker as
any request is; a request the worker cannot serve is answered with a Flower error naming why, so
the coordinator drops this client for that exchange instead of waiting out its deadline.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import TYPE_CHECKING

import httpx

from fedtune.core.errors import untrusted_text
from fedtune.deploy.fleet import FleetLink, Incoming, Refused
from fedtune.runtime import direct_wire as dw
from fedtune.runtime import flower_wire as wire
from fedtune.runtime.flower_grid import brief
from fedtune.runtime.polling import Poll

if TYPE_CHECKING:
    from fedtune.deploy.direct_link import DirectLoop
    from fedtune.deploy.local_worker import LocalWorker

log = logging.getLogger("fedtune")

_ANSWERING = threading.Lock()  # one message answered at a time, whichever way it came (Flower or direct)
REJOIN_S = (1.0, 2.0, 5.0)  # waits before joining again after losing the coordinator (the last one repeats)


def respond(payload: bytes, meta: dict, worker: LocalWorker, name: str) -> tuple[dict, bytes]:
    """The reply's (meta, payload) to one coordinator message, however it came: the worker's answer (a step
    of a pieced exchange when the message names one), or this client's name when an insecure coordinator
    asks who this is. One message is answered at a time, whichever way it came."""
    with _ANSWERING:
        return _respond(payload, meta, worker, name)


def _respond(payload: bytes, meta: dict, worker: LocalWorker, name: str) -> tuple[dict, bytes]:
    if "hello" in meta:  # insecure mode: the coordinator asks who this is
        return {"name": name}, b""
    client_id = wire.checked_int(meta.get(wire.CLIENT), 0, 2**31 - 1, "a client id")
    if wire.EXCHANGE not in meta:
        return {wire.CLIENT: client_id}, worker.serve_one(client_id, wire.checked_run(meta.get(wire.RUN)), payload)
    if wire.FETCH in meta:
        said, data = worker.pieces.fetch(client_id, meta)
    else:
        said, data = worker.pieces.piece(client_id, meta, payload)
    return {wire.CLIENT: client_id, **said}, bytes(data)


def answer_direct(meta: dict, payload: bytes, worker: LocalWorker, name: str) -> tuple[dict, bytes]:
    """The reply's (meta, payload) to a message that came over the direct channel; one that cannot be answered
    gets the reason (``direct_wire.ERROR``)."""
    try:
        return respond(payload, meta, worker, name)
    except Exception as exc:  # a request it cannot serve: say why, keep serving
        return {dw.ERROR: unanswerable(exc)}, b""


def answer(message, worker: LocalWorker, name: str):
    """The reply to one coordinator message that came through Flower."""
    from flwr.app import Message

    payload, meta = wire.unpack(message.content)
    said, data = respond(payload, meta, worker, name)
    return Message(wire.pack(data, said), reply_to=message)


def unanswerable(exc: BaseException) -> str:
    """Why a message could not be answered, logged here and told to the coordinator, whichever way it came."""
    log.exception("could not answer the coordinator's message: %s", untrusted_text(str(exc))[:200])
    return f"fedtune client: {type(exc).__name__}: {exc}"[:2000]


def failure(message, exc: BaseException):
    """A Flower error reply saying why ``message`` could not be answered."""
    from flwr.app import Error, Message

    return Message(Error(code=0, reason=unanswerable(exc)), reply_to=message)


def serve(
    link: FleetLink, worker: LocalWorker, name: str, poll: Poll, stop: threading.Event, direct: DirectLoop | None = None
) -> None:
    """Answer messages until ``stop``; returns on stop, raises httpx errors when the coordinator is lost. With
    ``direct``, the channel a message names beside it is opened and served too."""
    while not stop.is_set():
        got = link.pull()
        if got is None:  # with the direct channel open, Flower brings a message only if the channel fails
            stop.wait(poll.idle if direct is not None and direct.open else poll.next())
            continue
        if direct is not None:
            with contextlib.suppress(Exception):  # a message that names no channel: Flower alone serves
                direct.follow(wire.unpack(got.message.content)[1].get(dw.PORT))
        _answer_one(link, got, worker, name)
        poll.got()  # the next request of a conversation follows its reply closely


def _answer_one(link: FleetLink, got: Incoming, worker: LocalWorker, name: str) -> None:
    start = time.perf_counter()
    try:
        reply = answer(got.message, worker, name)
    except Exception as exc:  # a request it cannot serve: say why, keep serving
        reply = failure(got.message, exc)
    link.push(reply, got.run_id, time.perf_counter() - start)


def run_node(
    link: FleetLink,
    worker: LocalWorker,
    name: str,
    poll: Poll,
    stop: threading.Event,
    refused_retry_s: float,
    direct: DirectLoop | None = None,
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
            serve(link, worker, name, poll, stop, direct)
        except Exception as exc:  # transport trouble, or a SuperLink that forgot this node: join again
            log.warning("lost the coordinator (%s); joining again", brief(exc))
            link.deactivate()
            stop.wait(REJOIN_S[0])
    link.deactivate()
    return None
