"""Federated DPO, client side: parameter sharing's client whose local loss is a preference loss over pairs.

The reference's log-probabilities are taken at the round's start, before the first step, from the global
model just received (``reference: round``) or the initial adapter (``initial``); nothing of them is kept
between rounds, so a client's state is parameter sharing's.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from fedtune.client.data import ClientData
from fedtune.core.errors import DataError
from fedtune.core.types import ClientState, Params
from fedtune.paradigms.dpo.objective import Batch, preference_loss_sum, with_reference
from fedtune.paradigms.dpo.settings import DpoConfig
from fedtune.paradigms.parameter_sharing.client import ParameterSharingClient
from fedtune.paradigms.parameter_sharing.messages import TrainReply, TrainRequest


def check_pairs(data: ClientData, client_id: int) -> None:
    """DataError unless every training example of the client is a preference pair."""
    bare = sum(e.rejected_ids is None for e in data.train)
    if bare:
        raise DataError(
            f"client {client_id}: {bare} of {len(data.train)} training examples have no rejected reply; paradigm "
            "dpo trains on preference pairs {prompt, chosen, rejected} (docs/data.md)"
        )


class DpoClient(ParameterSharingClient):
    def __init__(self, *args: Any, settings: DpoConfig, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.settings = settings

    def train(self, client_id: int, req: TrainRequest, state: ClientState) -> tuple[TrainReply, ClientState]:
        data = self.data[client_id]
        check_pairs(data, client_id)
        start = self._start(client_id, req, state)
        s = self.settings
        loss = partial(preference_loss_sum, beta=s.beta, kind=s.loss, label_smoothing=s.label_smoothing)
        out = self.trainer.train(
            self.adapter,
            client_id,
            req.round,
            data,
            start.corrections,
            loss=loss,
            prepare=self._reference(start.params),
        )
        local = None if out.result.diverged else self.adapter.get_state()
        return self._finish(client_id, req, start, out, local)

    def _reference(self, start: Params) -> Callable[[list[Batch]], list[Batch]]:
        """The round's batches with the reference's log-probabilities; the adapter left at ``start``."""
        model = self.adapter.model
        if self.settings.reference == "round":
            return partial(with_reference, model)

        def initial(batches: list[Batch]) -> list[Batch]:
            self.adapter.load(self.initial)
            try:
                return with_reference(model, batches)
            finally:
                self.adapter.load(start)

        return initial
