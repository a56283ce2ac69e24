"""What both halves of a split step must agree on: micro-batch groups, learning rates and global clipping.

One optimizer step covers ``grad_accum`` micro-batches, exactly as ``client.local_training`` does on
the whole model. Gradient clipping is global over both parts: each side sends the squared norm of
its own gradients, so both scale by ``max_norm / (‖g‖ + 1e-6)`` (at most 1), as
``torch.nn.utils.clip_grad_norm_`` would on the unsplit model (``local_training.optimizer_step``
with the summed ``grad_sq_norm``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from fedtune.client.batching import batch_count
from fedtune.client.schedule import RoundSchedule
from fedtune.config import TrainingConfig


@dataclass(frozen=True)
class StepPlan:
    """A client's round as micro-batches: how many, which end an optimizer step, each step's lr."""

    count: int  # micro-batches
    grad_accum: int
    schedule: RoundSchedule
    round: int

    @classmethod
    def of(cls, cfg: TrainingConfig, rounds: int, round_index: int, num_examples: int, most: int) -> StepPlan:
        """The plan of a client with ``num_examples``, at most ``most`` micro-batches (paradigm.max_micro_batches)."""
        count = batch_count(num_examples, cfg.batch_size, cfg.grad_accum, cfg.local_steps, cfg.local_epochs)
        return cls(min(count, most), cfg.grad_accum, RoundSchedule.of(cfg, rounds), round_index)

    @property
    def steps(self) -> int:
        return -(-self.count // self.grad_accum)

    def ends_step(self, t: int) -> bool:
        """Whether micro-batch ``t`` is the last of its optimizer step."""
        return (t + 1) % self.grad_accum == 0 or t == self.count - 1

    def group(self, t: int) -> range:
        """The micro-batches of ``t``'s optimizer step."""
        start = t - t % self.grad_accum
        return range(start, min(start + self.grad_accum, self.count))

    def lr(self, t: int) -> float:
        """Learning rate of the optimizer step micro-batch ``t`` belongs to."""
        return self.schedule.lr_at(self.round, t // self.grad_accum, self.steps)


def sq_norm(tensors: Iterable[torch.Tensor]) -> float:
    """Σ ‖g‖² over the gradients of ``tensors`` (those without one count 0), each tensor's norm in float32."""
    total = 0.0
    for t in tensors:
        if t.grad is not None:
            total += float(torch.linalg.vector_norm(t.grad.float())) ** 2
    return total
