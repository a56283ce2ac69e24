"""KD-FedLLM's messages: which public examples to score (and the consensus to learn from) down,
the client's top-k token distributions up.

Token ids travel in the narrowest integer type the vocabulary allows (``distributions.id_dtype``);
log-probabilities in wire form (``fedtune.wire.link``), through the direction's value codecs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from fedtune.core.types import Params

LOGP = "logp"  # the one tensor name inside a wire-form log-probability field


@dataclass(frozen=True)
class KDRequest:
    """Server -> client: train, then score public examples ``score``.

    With logits on the downlink, ``teach`` names the public examples of the previous round's
    consensus (``teacher_ids``, ``teacher_logp``: one row per response position), which the
    client distils into its own adapter first; with the adapter on the downlink, ``params`` is the
    global adapter to start from and the teacher fields are empty.
    """

    KIND: ClassVar[str] = "kd_round"
    TENSORS: ClassVar[tuple[str, ...]] = ("params", "score", "teach", "teacher_ids", "teacher_logp")
    round: int
    score: torch.Tensor  # (S,) int32 public indices to score this round
    teach: torch.Tensor  # (S',) int32 public indices the teacher rows belong to; (0,) without a teacher
    teacher_ids: torch.Tensor  # (P', k') consensus token ids
    public_digest: str  # fingerprint of the public set the indices refer to
    params: Params = field(default_factory=dict)  # wire form of the global adapter (downlink=adapter)
    teacher_logp: Params = field(default_factory=dict)  # wire form of {"logp": (P', k')}


@dataclass(frozen=True)
class KDReply:
    """Client -> server: top-k token ids and log-probabilities at every response position of ``score``."""

    KIND: ClassVar[str] = "kd_reply"
    TENSORS: ClassVar[tuple[str, ...]] = ("ids", "logp")
    round: int
    ids: torch.Tensor  # (P, k) token ids, most likely first
    num_examples: int  # the client's private training examples (kd.weighting=examples)
    steps: int  # optimizer steps this round: distillation plus private training
    train_loss: float  # private training loss
    distill_loss: float | None  # distillation loss (KL, times T^2), logits downlink after round 1
    local_train_s: float  # client compute this round: distillation, private training and scoring
    logp: Params = field(default_factory=dict)  # wire form of {"logp": (P, k)}
    status: Literal["ok", "diverged"] = "ok"
    error: str | None = None
    peak_bytes: int = 0  # the model it holds plus its peak activations for backward (client.cost)
    flops: float = 0.0  # analytic FLOPs of its distillation, private training and scoring this round (client.cost)
    trained_tokens: int = 0  # non-padding input tokens of its distillation and private training micro-batches
