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
from dataclasses import replace
from typing import Any, NamedTuple, Protocol, TypeVar

from fedtune.core.types import Params, ServerState
from fedtune.paradigms.base import BadReply, Conversation, Exchange
from fedtune.paradigms.offsite.messages import EmulatorReply, EmulatorRequest
from fedtune.paradigms.parameter_sharing.server import ParameterSharing
from fedtune.wire.link import max_wire_bytes

REPLY_BYTES = max_wire_bytes(0, 0)  # an emulator reply is a header
T = TypeVar("T")


class OffsiteState(NamedTuple):
    """Parameter sharing's algorithm state, and the emulator's middle as re-aligned so far ({}: never)."""

    sharing: NamedTuple
    middle: dict


class EmulatorHost(Protocol):
    """The server's emulator (``host.py``): what clients are sent and FedBiOT's re-alignment of it."""

    initial: Params  # the initial adapter on the emulator
    realigns: bool  # whether ``realign`` changes the middle (FedBiOT), which the server state then holds

    def weights(self) -> Params: ...  # the emulator's parameters by its own names, as they are now

    def digest(self) -> str: ...  # of ``weights()``

    def middle(self) -> Params: ...  # a copy of the middle blocks' tensors (what re-alignment changes)

    def middle_names(self) -> list[str]: ...  # their names among ``weights()``

    def load_middle(self, middle: Params) -> None: ...  # make the emulator's middle these tensors

    def realign(self, params: Params, r: int) -> dict[str, Any] | None: ...  # None: re-alignment is off


class Offsite:
    name = "offsite"

    def __init__(self, inner: ParameterSharing, host: EmulatorHost, plug_in: Callable[[Params], Params], info: dict):
        """``inner``: parameter sharing over the emulator's adapter; ``plug_in(params)``: that adapter renamed
        onto the full model; ``info``: the emulator's facts for summary.json."""
        self.inner, self.host, self.plug_in, self._info = inner, host, plug_in, info
        self.issued: set[str] = set()  # emulators this server sent: a client holding one is sent the middle only

    def initial_state(self) -> ServerState:
        inner = self.inner.initial_state()
        middle = self.host.middle() if self.host.realigns else {}
        return replace(inner, algorithm=OffsiteState(inner.algorithm, middle))

    def _inner(self, state: ServerState) -> ServerState:
        """``state`` as parameter sharing sees it, the emulator's middle made the state's."""
        if state.algorithm.middle:
            self.host.load_middle(state.algorithm.middle)
        return replace(state, algorithm=state.algorithm.sharing)

    def round(self, r: int, state: ServerState, clients: list[int]) -> Conversation[tuple[ServerState, dict]]:
        inner = self._inner(state)
        ready = yield from self._deliver(r, clients)
        new, metrics = yield from _relay(self.inner.round(r, inner, ready))
        middle = state.algorithm.middle
        realigned = self.host.realign(new.params, r)
        if realigned is not None:
            metrics = {**metrics, **realigned}
            middle = self.host.middle()
        return replace(new, algorithm=OffsiteState(new.algorithm, middle)), metrics

    def _deliver(self, r: int, clients: list[int]) -> Conversation[list[int]]:
        """The sampled clients that hold the emulator once asked (and, where missing, sent it)."""
        if not clients:
            return []
        digest = self.host.digest()
        self.issued.add(digest)

        def status(client_id: int, reply: EmulatorReply) -> EmulatorReply:
            if reply.round != r:
                raise BadReply(f"stale reply for round {reply.round}")
            if reply.digest != digest:
                raise BadReply("answered about another emulator than the one asked about")
            return reply

        ask = {c: EmulatorRequest(r, digest) for c in clients}
        asked = yield Exchange("train", ask, EmulatorReply, status, REPLY_BYTES)
        held = [c for c, rep in asked.accepted.items() if rep.status == "held"]
        missing = {c: rep.holds for c, rep in asked.accepted.items() if rep.status == "missing"}
        if missing:

            def took(client_id: int, reply: EmulatorReply) -> str:
                if status(client_id, reply).status != "held":
                    raise BadReply("was sent the emulator and still does not hold it")
                return "held"

            weights = self.host.weights()
            whole = EmulatorRequest(r, digest, weights, self.host.initial)  # one object: encoded once for all
            middle = self.host.middle_names()
            partial = {  # one object per emulator held: a client holding an earlier one gets the middle only
                base: EmulatorRequest(r, digest, {n: weights[n] for n in middle}, base=base)
                for base in set(missing.values()) & (self.issued - {digest})
            }
            send = {c: partial.get(holds, whole) for c, holds in missing.items()}
            sent = yield Exchange("train", send, EmulatorReply, took, REPLY_BYTES)
            held += list(sent.accepted)
        return sorted(held)

    def evaluate(self, r: int, state: ServerState, per_client: bool) -> Conversation[dict]:
        return (yield from _relay(self.inner.evaluate(r, self._inner(state), per_client)))

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


__all__ = ["EmulatorHost", "Offsite", "OffsiteState"]
