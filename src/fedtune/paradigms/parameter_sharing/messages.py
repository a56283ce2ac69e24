"""Parameter sharing's messages: the global adapter down, the client's update up.

``params`` and ``delta`` travel in wire form (``fedtune.wire.link``): passed through the direction's
codec chain and packed, with the codec meta as one more tensor. Fields that belong to one algorithm
carry its name, so that no other algorithm's tensors can be taken for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from fedtune.core.types import Params


@dataclass(frozen=True)
class TrainRequest:
    """Server -> client: train from these global adapter parameters in this round."""

    KIND: ClassVar[str] = "train"
    TENSORS: ClassVar[tuple[str, ...]] = ("params", "scaffold_c")
    round: int
    params: Params  # wire form of the global adapter, or of the change to the one the client holds
    scaffold_c: Params = field(default_factory=dict)  # SCAFFOLD: the server control variate c; {}: off
    downlink: Literal["full", "update"] = "full"  # "update": params is the change to what the client holds
    secagg: dict[str, float] = field(default_factory=dict)  # secure aggregation's settings ({}: off; secure_client)


@dataclass(frozen=True)
class TrainReply:
    """Client -> server: the update (local - global) and what it cost; no delta if diverged."""

    KIND: ClassVar[str] = "train_reply"
    TENSORS: ClassVar[tuple[str, ...]] = ("delta", "scaffold_delta_c", "secagg_keys")
    round: int
    delta: Params  # wire form of local - global
    num_examples: int  # size of the client's training set (FedAvg weight)
    num_tokens: int  # target tokens in that set (token weighting)
    steps: int
    train_loss: float
    local_train_s: float  # pure local-training time (forward, backward, optimizer)
    status: Literal["ok", "diverged"] = "ok"
    error: str | None = None
    scaffold_delta_c: Params = field(default_factory=dict)  # SCAFFOLD: c_i(new) - c_i(old)
    peak_bytes: int = 0  # the model it holds plus its peak activations for backward (client.cost)
    flops: float = 0.0  # analytic FLOPs of its training this round (client.cost)
    trained_tokens: int = 0  # non-padding input tokens of the micro-batches it trained this round (throughput)
    secagg_keys: Params = field(default_factory=dict)  # secure aggregation: "c_pk", "s_pk" (uint8, 32); delta is {}
