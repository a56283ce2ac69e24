"""Personalised FL's own message: evaluate your personalised model. Training is parameter sharing's
``TrainRequest``/``TrainReply``; the global model's evaluation is ``EvalRequest``, its reply ``EvalReply``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from fedtune.core.types import Params


@dataclass(frozen=True)
class PersonalEvalRequest:
    """Server -> client: evaluate, on your held-out share, these global parameters with your personal tensors in
    their place (the tensors you have none of yet stay the global ones). The reply is an ``EvalReply``."""

    KIND: ClassVar[str] = "personal_evaluate"
    TENSORS: ClassVar[tuple[str, ...]] = ("params",)
    READS_ONLY: ClassVar[bool] = True  # serving it changes no client state (wire/protocol.py)
    round: int
    params: Params = field(default_factory=dict)  # wire form of what the server shares (the shared part or all)
