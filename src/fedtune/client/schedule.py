"""Learning-rate schedules that follow the federation's global step across rounds.

Peer frameworks restart the schedule every round because local training is split into
rounds; here scope='federation' places local step s of round r at global step
(r - 1) * S + s of R * S (S steps per round, R rounds), which under full participation is
exactly the client's own global step. scope='round' restarts each round, on request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedtune.client.batching import batch_count

if TYPE_CHECKING:
    from fedtune.config import TrainingConfig


def lr_at(
    base_lr: float,
    schedule: str,
    warmup_ratio: float,
    step: int,
    steps_per_round: int,
    round_index: int,
    total_rounds: int,
    scope: str = "federation",
) -> float:
    """Learning rate for 0-based local ``step`` of 1-based round ``round_index``."""
    if scope == "federation":
        t, total = (round_index - 1) * steps_per_round + step, total_rounds * steps_per_round
    elif scope == "round":
        t, total = step, steps_per_round
    else:
        raise ValueError(f"training.schedule_scope={scope!r}; allowed: federation, round")
    warmup = round(warmup_ratio * total)
    if t < warmup:
        return base_lr * (t + 1) / warmup
    if schedule == "constant":
        return base_lr
    progress = (t - warmup) / max(1, total - warmup)  # 0 at the end of warmup, -> 1 at the end
    if schedule == "linear":
        return base_lr * (1.0 - progress)
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"training.lr_schedule={schedule!r}; allowed: constant, linear, cosine")


@dataclass(frozen=True)
class RoundSchedule:
    """A client's local steps and learning rates per round, as the server can work them out from the config."""

    lr: float
    schedule: str
    warmup_ratio: float
    scope: str
    total_rounds: int
    batch_size: int
    grad_accum: int
    local_steps: int | None  # steps mode: every client takes exactly this many
    local_epochs: float | None  # epochs mode: the steps follow the client's example count

    @classmethod
    def of(cls, t: TrainingConfig, total_rounds: int) -> RoundSchedule:
        return cls(
            t.lr,
            t.lr_schedule,
            t.warmup_ratio,
            t.schedule_scope,
            total_rounds,
            t.batch_size,
            t.grad_accum,
            t.local_steps,
            t.local_epochs,
        )

    def steps(self, num_examples: int) -> int:
        """Optimizer steps of a round for a client with ``num_examples`` examples (``batching.micro_batches``)."""
        batches = batch_count(num_examples, self.batch_size, self.grad_accum, self.local_steps, self.local_epochs)
        return -(-batches // self.grad_accum)

    def lr_at(self, round_index: int, step: int, steps: int) -> float:
        """The learning rate of 0-based local ``step`` of ``steps`` in 1-based round ``round_index``."""
        return lr_at(self.lr, self.schedule, self.warmup_ratio, step, steps, round_index, self.total_rounds, self.scope)

    def lr_sum(self, round_index: int, steps: int) -> float:
        """The learning rates of a round's ``steps`` local steps, summed in step order as a client sums them
        (SCAFFOLD's local path length)."""
        total = 0.0
        for step in range(steps):
            total += self.lr_at(round_index, step, steps)
        return total
