"""Personalised FL, server side: parameter sharing's round on what is shared; clients evaluate both models.

The server never holds a personal tensor. With a split adapter (FedPer, FedRep) its state is the shared part,
and ``complete`` fills in the personal part as every client starts it (the seeded initial adapter's) wherever a
whole adapter is needed: the server's own evaluation and the exported ``final_adapter/``. Per-client evaluation
asks each client twice: the global model on its held-out share (``client_eval_*``, as in parameter sharing)
and its personalised model there (``personal_eval_*``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedtune.core import rng
from fedtune.core.types import Params, ServerState
from fedtune.paradigms.base import Conversation
from fedtune.paradigms.evaluation import EvalRequest, client_record, eval_exchange
from fedtune.paradigms.parameter_sharing.server import ParameterSharing
from fedtune.paradigms.personalised.messages import PersonalEvalRequest
from fedtune.wire.link import Link


class Personalised:
    name = "personalised"

    def __init__(self, inner: ParameterSharing, complete: Callable[[Params], Params], info: dict[str, Any]):
        """``inner``: parameter sharing over the shared tensors; ``complete(params)``: a whole adapter of them."""
        self.inner, self.complete, self._info = inner, complete, info

    def initial_state(self) -> ServerState:
        return self.inner.initial_state()

    def round(self, r: int, state: ServerState, clients: list[int]) -> Conversation[tuple[ServerState, dict]]:
        return (yield from self.inner.round(r, state, clients))

    def evaluate(self, r: int, state: ServerState, per_client: bool) -> Conversation[dict]:
        out: dict[str, Any] = {}
        if self.inner.evaluate_adapter is not None:  # it completes the adapter itself (setup)
            out.update(self.inner.evaluate_adapter(state.params, r))
        if not per_client:
            return out
        s = self.inner.settings
        link = self.inner.downlink if not s.downlink_updates else Link()
        gen = rng.torch_generator(rng.EVAL_DOWNLINK, s.seed, r)
        wire = link.encode(state.params, {}, gen)[0]  # one encoding, sent in both exchanges
        asks = {"client_eval": EvalRequest(r, params=wire), "personal_eval": PersonalEvalRequest(r, params=wire)}
        for prefix, request in asks.items():
            replies = yield eval_exchange(dict.fromkeys(range(s.num_clients), request), r)
            out.update(client_record(replies.accepted, prefix))
        return out

    def final_adapters(self, state: ServerState) -> dict[str, Params]:
        return {"": self.complete(state.params)}

    def info(self) -> dict[str, Any]:
        return dict(self._info)


__all__ = ["Personalised"]
