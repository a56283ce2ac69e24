"""The messages that cross between server and clients, as frozen dataclasses.

Runtimes move only ``Envelope``s (client id + bytes); ``fedtune.wire.messages`` turns these
dataclasses into those bytes and back. ``params`` and ``delta`` travel in wire form
(``fedtune.wire.link``): passed through the direction's codec chain and packed, with the codec
meta as one more tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

Params = dict[str, torch.Tensor]  # parameter name -> tensor (an adapter state or a delta)


@dataclass(frozen=True)
class TrainRequest:
    """Server -> client: train from these global adapter parameters in this round."""

    KIND: ClassVar[str] = "train"
    TENSORS: ClassVar[tuple[str, ...]] = ("params", "control")
    round: int
    params: Params  # wire form of the global adapter (see module docstring)
    control: Params = field(default_factory=dict)  # SCAFFOLD: the server control variate c
    downlink: str = "full"  # "full": params is the adapter; "update": the change to what the client holds


@dataclass(frozen=True)
class TrainReply:
    """Client -> server: the update (local - global) and what it cost; no delta if diverged."""

    KIND: ClassVar[str] = "train_reply"
    TENSORS: ClassVar[tuple[str, ...]] = ("delta", "control_delta")
    round: int
    delta: Params  # wire form of local - global (see module docstring)
    num_examples: int  # size of the client's training set (FedAvg weight)
    num_tokens: int  # target tokens in that set (token weighting)
    steps: int
    train_loss: float
    local_train_s: float  # pure local-training time (forward, backward, optimizer)
    status: str = "ok"  # "ok" | "diverged"
    error: str | None = None
    control_delta: Params = field(default_factory=dict)  # SCAFFOLD: c_i(new) - c_i(old)


@dataclass(frozen=True)
class EvalRequest:
    """Server -> client: evaluate these global parameters on your held-out share."""

    KIND: ClassVar[str] = "evaluate"
    TENSORS: ClassVar[tuple[str, ...]] = ("params",)
    round: int
    params: Params  # wire form of the global adapter


@dataclass(frozen=True)
class EvalReply:
    """Client -> server: metrics of the global model on the client's held-out share."""

    KIND: ClassVar[str] = "eval_reply"
    TENSORS: ClassVar[tuple[str, ...]] = ()
    round: int
    metrics: dict[str, float] = field(default_factory=dict)


Message = TrainRequest | TrainReply | EvalRequest | EvalReply


@dataclass(frozen=True)
class Envelope:
    """What a runtime carries: an addressed, already-encoded message."""

    client_id: int
    payload: bytes
