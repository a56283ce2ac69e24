"""The toy paradigm's halves, built from a plan like any paradigm's."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, NamedTuple

from fedtune.core.types import ServerState
from fedtune.paradigms.base import Conversation, Exchange, check_answered, check_numbers
from fedtune.wire.link import max_wire_bytes
from tests.paradigms.toy.messages import Number, Report


class ToyState(NamedTuple):
    mean: float = 0.0  # the last round's average
    rounds: int = 0


class ToyServer:
    name = "toy"

    def __init__(self, scale: float):
        self.scale = scale

    def initial_state(self) -> ServerState:
        return ServerState(0, {}, ToyState())

    def round(self, r: int, state: ServerState, clients: list[int]) -> Conversation[tuple[ServerState, dict]]:
        def read(client_id: int, reply: Number) -> float:
            check_answered(reply, r)
            check_numbers(value=reply.value)
            return reply.value

        replies = yield Exchange(
            "train", dict.fromkeys(clients, Report(r, self.scale)), Number, read, max_wire_bytes(0, 0)
        )
        values = [replies.accepted[c] for c in sorted(replies.accepted)]
        mean = sum(values) / len(values)
        return replace(state, algorithm=ToyState(mean, state.algorithm.rounds + 1)), {"toy_mean": mean}

    def evaluate(self, r: int, state: ServerState, per_client: bool) -> Conversation[dict]:
        return {"toy_eval": state.algorithm.mean}
        yield  # a conversation without exchanges

    def final_adapters(self, state: ServerState) -> dict[str, Any]:
        return {}

    def info(self) -> dict[str, Any]:
        return {"toy_scale": self.scale}


class ToyClient:
    serves = (Report,)

    def __init__(self, data):
        self.data = data

    def serve(self, client_id: int, request: Report, state):
        return Number(request.round, request.scale * len(self.data[client_id].train), steps=1), state


def server(plan, bench, evaluate_adapter, weight_cap) -> ToyServer:
    return ToyServer(plan.settings.scale)


def client(plan, bench, data, eval_set=None) -> ToyClient:
    return ToyClient(data)
