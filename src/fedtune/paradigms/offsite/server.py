"""Offsite-tuning, server side: make sure each sampled client holds the emulator, then parameter sharing's round.

The global adapter is kept as the emulator names it (its adapter blocks are the emulator's first and
last blocks); ``plug_in`` renames it onto the full model, which is what is evaluated as the
federation's model and exported. Each round asks the sampled clients whether their process holds the
emulator of this digest (a header and nothing else); those that do not are sent it whole, once per
process, in bytes down like everything else. A client that answers neither "held" nor takes the
emulator is dropped for the round with the reason, as for any bad reply.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from fedtune.core.types import Params, ServerState
from fedtune.paradigms.base import BadReply, Conversation, Exchange
from fedtune.paradigms.offsite.messages import EmulatorReply, EmulatorRequest
from fedtune.paradigms.parameter_sharing.server import ParameterSharing
from fedtune.wire.link import max_wire_bytes

REPLY_BYTES = max_wire_bytes(0, 0)  # an emulator reply is a header
T = TypeVar("T")


@dataclass(frozen=True)
class Emulator:
    """What clients are sent, once per process: the emulator's weights, their digest, the initial adapter on it."""

    weights: Params
    digest: str
    initial: Params


class Offsite:
    name = "offsite"

    def __init__(self, inner: ParameterSharing, emulator: Emulator, plug_in: Callable[[Params], Params], info: dict):
        """``inner``: parameter sharing over the emulator's adapter; ``plug_in(params)``: that adapter renamed
        onto the full model; ``info``: the emulator's facts for summary.json."""
        self.inner, self.emulator, self.plug_in, self._info = inner, emulator, plug_in, info

    def initial_state(self) -> ServerState:
        return self.inner.initial_state()

    def round(self, r: int, state: ServerState, clients: list[int]) -> Conversation[tuple[ServerState, dict]]:
        ready = yield from self._deliver(r, clients)
        return (yield from _relay(self.inner.round(r, state, ready)))

    def _deliver(self, r: int, clients: list[int]) -> Conversation[list[int]]:
        """The sampled clients that hold the emulator once asked (and, where missing, sent it)."""
        if not clients:
            return []
        e = self.emulator

        def status(client_id: int, reply: EmulatorReply) -> str:
            if reply.round != r:
                raise BadReply(f"stale reply for round {reply.round}")
            if reply.digest != e.digest:
                raise BadReply("answered about another emulator than the one asked about")
            return reply.status

        asked = yield Exchange(
            "train", {c: EmulatorRequest(r, e.digest) for c in clients}, EmulatorReply, status, REPLY_BYTES
        )
        held = [c for c, s in asked.accepted.items() if s == "held"]
        missing = [c for c, s in asked.accepted.items() if s == "missing"]
        if missing:

            def took(client_id: int, reply: EmulatorReply) -> str:
                if status(client_id, reply) != "held":
                    raise BadReply("was sent the emulator and still does not hold it")
                return "held"

            whole = EmulatorRequest(r, e.digest, e.weights, e.initial)  # one object: encoded once for all of them
            sent = yield Exchange("train", {c: whole for c in missing}, EmulatorReply, took, REPLY_BYTES)
            held += list(sent.accepted)
        return sorted(held)

    def evaluate(self, r: int, state: ServerState, per_client: bool) -> Conversation[dict]:
        return (yield from _relay(self.inner.evaluate(r, state, per_client)))

    def final_adapters(self, state: ServerState) -> dict[str, Params]:
        return {"": self.plug_in(state.params)}

    def info(self) -> dict[str, Any]:
        return dict(self._info)


def _relay(conversation: Conversation[T]) -> Conversation[T]:
    """Parameter sharing's conversation, each exchange also reading an emulator reply: what a client process
    that has lost the emulator (restarted since it was asked) answers instead; it drops that client."""
    try:
        ex = next(conversation)
        while True:
            ex = conversation.send((yield _tolerant(ex)))
    except StopIteration as done:
        return done.value


def _tolerant(ex: Exchange) -> Exchange:
    kinds = ex.reply if isinstance(ex.reply, tuple) else (ex.reply,)

    def read(client_id: int, reply: Any) -> Any:
        if isinstance(reply, EmulatorReply):
            raise BadReply("its process no longer holds the emulator (restarted?); it is sent again next round")
        return ex.read(client_id, reply)

    return replace(ex, reply=(*kinds, EmulatorReply), read=read)


__all__ = ["Emulator", "Offsite"]
