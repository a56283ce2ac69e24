"""Split learning's messages: one conversation per client per round, a few exchanges per local step.

Per micro-batch t of a client's round (docs/algorithms/split.md):

  ``Forward``      server -> client: the gradient at the first cut for micro-batch t-1 (none for t = 0;
                   the client part's adapter with t = 0), and at the end of an optimizer step the server
                   part's squared gradient norm (global clipping, as one model would clip). With ``u``
                   it opens each optimizer step only: within a step the next activations ride in
                   ``BackReply`` and the last gradient in ``Back``, so a step of A micro-batches costs
                   A + 1 round trips, not 2A
  ``Activations``  client -> server: the hidden states at the first cut for micro-batch t, its 2-D
                   attention mask, and with ``vanilla`` its labels
  ``Back``         server -> client (``u`` only): the hidden states at the second cut, and the gradient
                   at the first cut for micro-batch t-1 when it is in the same optimizer step
  ``BackReply``    client -> server (``u`` only): their gradient and the micro-batch's loss, and the
                   activations of micro-batch t+1 when it is in the same optimizer step
  ``Forward`` with t = the number of micro-batches: the last gradient; the reply is ``Done``
  ``Done``         client -> server: the client part's update and what the round cost

Hidden states and gradients travel in wire form (``fedtune.wire.link``), through
``split.activation_codecs``; nothing else of the model crosses (no caches, no states).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from fedtune.core.types import Params

EMPTY = torch.zeros(0, dtype=torch.uint8)


@dataclass(frozen=True)
class Forward:
    """Server -> client: finish micro-batch ``step - 1`` with ``grad``; send the activations of ``step``."""

    KIND: ClassVar[str] = "split_forward"
    TENSORS: ClassVar[tuple[str, ...]] = ("params", "grad")
    round: int
    step: int  # the micro-batch whose activations are wanted; = their number: the round ends
    params: Params = field(default_factory=dict)  # step 0: wire form of the client part's adapter
    grad: Params = field(default_factory=dict)  # wire form {"h": dL/dh} at the first cut of micro-batch step - 1
    server_sq_norm: float | None = None  # after an optimizer step's last micro-batch: ‖server grads‖²
    continues: bool = False  # step > 0: the client goes on from the state this round left (a deployed client's
    # store otherwise starts a request from the state before its round, so that a repeated round replays)


@dataclass(frozen=True)
class Activations:
    """Client -> server: hidden states at the first cut of micro-batch ``step``."""

    KIND: ClassVar[str] = "split_activations"
    TENSORS: ClassVar[tuple[str, ...]] = ("hidden", "attention_mask", "labels")
    round: int
    step: int
    hidden: Params  # wire form {"h": (B, T, H)}
    attention_mask: torch.Tensor  # (B, T) uint8: 1 for tokens, 0 for padding
    labels: torch.Tensor = field(default_factory=lambda: EMPTY)  # vanilla: (B, T) int64, IGNORE where no target
    step_tokens: int = 0  # target tokens of the optimizer step this micro-batch belongs to (the loss's divisor)
    num_examples: int = 0  # step 0: the client's training examples (its weight and its number of micro-batches)
    num_tokens: int = 0  # step 0: target tokens in its training set (token weighting)
    client_sq_norm: float | None = None  # after an optimizer step: ‖client grads‖² (server-side clipping)
    codec_error: float = 0.0  # relative error of the hidden states through the activation codecs


@dataclass(frozen=True)
class Back:
    """Server -> client (shape u): the hidden states at the second cut of micro-batch ``step``."""

    KIND: ClassVar[str] = "split_back"
    TENSORS: ClassVar[tuple[str, ...]] = ("hidden", "grad")
    round: int
    step: int
    hidden: Params  # wire form {"h": (B, T, H)}
    grad: Params = field(default_factory=dict)  # wire form {"h": dL/dh} at the first cut of micro-batch step - 1,
    # when it is in the same optimizer step (otherwise that gradient opened this step, in a Forward)
    continues: bool = True  # always within a round (see Forward)


@dataclass(frozen=True)
class BackReply:
    """Client -> server (shape u): dL/dh at the second cut, the micro-batch's summed loss, and the
    activations of micro-batch ``step + 1`` when it is in the same optimizer step."""

    KIND: ClassVar[str] = "split_back_reply"
    TENSORS: ClassVar[tuple[str, ...]] = ("grad", "next_hidden", "next_mask")
    round: int
    step: int
    grad: Params  # wire form {"h": (B, T, H)}
    loss_sum: float
    tokens: int
    codec_error: float = 0.0
    next_hidden: Params = field(default_factory=dict)  # wire form {"h": (B, T, H)} of micro-batch step + 1
    next_mask: torch.Tensor = field(default_factory=lambda: EMPTY)  # its (B, T) uint8 attention mask
    next_codec_error: float = 0.0

    def carried(self) -> Activations:
        """The activations of micro-batch ``step + 1`` this reply carries, as their own message would."""
        return Activations(
            self.round, self.step + 1, self.next_hidden, self.next_mask, codec_error=self.next_codec_error
        )

    @property
    def carries(self) -> bool:
        return bool(self.next_hidden) or self.next_mask.numel() > 0


@dataclass(frozen=True)
class Done:
    """Client -> server: the client part's update (local - received) and what the round cost it."""

    KIND: ClassVar[str] = "split_done"
    TENSORS: ClassVar[tuple[str, ...]] = ("delta",)
    round: int
    delta: Params  # wire form of the client part's local - global
    steps: int
    local_train_s: float  # the client's compute this round (forward, backward, optimizer), summed
    client_sq_norm: float | None = None  # ‖client grads‖² of the last optimizer step (server-side clipping)
    peak_bytes: int = 0  # its part of the model plus its peak activations for backward (client.cost)
    flops: float = 0.0  # analytic FLOPs of its part this round, the front's second forward included
