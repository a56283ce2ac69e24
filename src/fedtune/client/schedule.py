"""Learning-rate schedules that follow the federation's global step across rounds.

Peer frameworks restart the schedule every round because local training is split into
rounds; here scope='federation' places local step s of round r at global step
(r - 1) * S + s of R * S (S steps per round, R rounds), which under full participation is
exactly the client's own global step. scope='round' restarts each round, on request.
scope='by_round' holds one rate through a round and decays it over rounds, at progress r / R
(FlowerTune's per-round cosine: lr_min + (lr - lr_min)·(1 + cos(π r / R)) / 2). Linear and cosine
decay towards ``lr_min`` (default 0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedtune.aggregation.clipping import update_norm
from fedtune.client.batching import batch_count

if TYPE_CHECKING:
    import torch

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
    lr_min: float = 0.0,
) -> float:
    """Learning rate for 0-based local ``step`` of 1-based round ``round_index``."""
    if scope == "by_round":  # one rate per round; warmup counts rounds
        t, total = round_index, total_rounds
        warmup = round(warmup_ratio * total)
        if t <= warmup:
            return base_lr * t / max(1, warmup)
        progress = (t - warmup) / max(1, total - warmup)
    else:
        if scope == "federation":
            t, total = (round_index - 1) * steps_per_round + step, total_rounds * steps_per_round
        elif scope == "round":
            t, total = step, steps_per_round
        else:
            raise ValueError(f"training.schedule_scope={scope!r}; allowed: federation, round, by_round")
        warmup = round(warmup_ratio * total)
        if t < warmup:
            return base_lr * (t + 1) / warmup
        progress = (t - warmup) / max(1, total - warmup)  # 0 at the end of warmup, -> 1 at the end
    if schedule == "constant":
        return base_lr
    if schedule == "linear":
        return lr_min + (base_lr - lr_min) * (1.0 - progress)
    if schedule == "cosine":
        return lr_min + (base_lr - lr_min) * 0.5 * (1.0 + math.cos(math.pi * progress))
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
    lr_min: float = 0.0

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
            t.lr_min,
        )

    def steps(self, num_examples: int) -> int:
        """Optimizer steps of a round for a client with ``num_examples`` examples (``batching.micro_batches``)."""
        batches = batch_count(num_examples, self.batch_size, self.grad_accum, self.local_steps, self.local_epochs)
        return -(-batches // self.grad_accum)

    def lr_at(self, round_index: int, step: int, steps: int) -> float:
        """The learning rate of 0-based local ``step`` of ``steps`` in 1-based round ``round_index``."""
        return lr_at(
            self.lr,
            self.schedule,
            self.warmup_ratio,
            step,
            steps,
            round_index,
            self.total_rounds,
            self.scope,
            self.lr_min,
        )

    def lr_sum(self, round_index: int, steps: int) -> float:
        """The learning rates of a round's ``steps`` local steps, summed in step order as a client sums them
        (SCAFFOLD's local path length)."""
        total = 0.0
        for step in range(steps):
            total += self.lr_at(round_index, step, steps)
        return total


ADAM_BETAS = (0.9, 0.999)  # torch's AdamW defaults, which make_optimizer keeps


def adam_step_ratio(t: int, betas: tuple[float, float] = ADAM_BETAS) -> float:
    """The most |m̂_t| / √v̂_t can be at Adam's 1-based step ``t`` (fresh state), whatever the gradients.

    m_t = (1-β1) Σ β1^(t-i) g_i and v_t = (1-β2) Σ β2^(t-i) g_i², so by Cauchy–Schwarz
    |m_t| ≤ (1-β1) √(Σ_k (β1²/β2)^k) √(v_t / (1-β2)) over k < t; with the bias corrections
    √(1-β2^t) / (1-β1^t) that is the ratio below (1 at t = 1, about 7.3 for large t at the defaults).
    """
    b1, b2 = betas
    s = sum((b1 * b1 / b2) ** k for k in range(t))
    return (1 - b1) * math.sqrt(s) * math.sqrt(1 - b2**t) / ((1 - b1**t) * math.sqrt(1 - b2))


@dataclass(frozen=True)
class UpdateBound:
    """``aggregation.max_update_norm: auto``: the most honest local training can move an adapter in a round.

    With AdamW every step moves each value by at most lr_t · ``adam_step_ratio(t)``; with SGD the step is
    lr_t times the clipped gradient (``training.max_grad_norm``); decoupled or coupled weight decay adds
    lr_t · wd · ‖θ_t‖. A zeroth-order step is -lr_t g z with |g| at most ``training.zo_clip`` and z
    standard normal over the n values, so ‖z‖ <= √n + 10 but with probability below e^-50 (Gaussian
    concentration of the norm, a 1-Lipschitz function). Summed over the most steps a client can take in the
    round (the config's, or those of ``federation.max_client_examples`` examples), with 5% slack for float
    rounding. SGD without gradient clipping (or zeroth-order steps without ``zo_clip``), or with DP-SGD's
    noise, moves without bound: then there is no auto bound (``of`` says why).
    """

    schedule: RoundSchedule
    optimizer: str
    max_grad_norm: float | None  # SGD's gradient clip; zo_sgd: training.zo_clip, the most |g| can be
    weight_decay: float
    steps: int

    @classmethod
    def of(
        cls, t: TrainingConfig, total_rounds: int, max_examples: int, dp_sgd: bool = False
    ) -> tuple[UpdateBound | None, str]:
        """(the bound, or None and why there is none); ``dp_sgd``: clients train with DP-SGD."""
        schedule = RoundSchedule.of(t, total_rounds)
        if t.backprop_free:  # forward: a step's estimate is capped at the same bound (client.forward_gradient)
            if t.zo_clip is None:
                return None, "zeroth-order steps can move the adapter without bound (training.zo_clip is off)"
            return cls(schedule, "zo_sgd", t.zo_clip, 0.0, schedule.steps(max_examples)), ""
        if t.optimizer == "sgd" and (t.max_grad_norm is None or dp_sgd):
            why = "training.max_grad_norm is off" if t.max_grad_norm is None else "DP-SGD adds unbounded noise"
            return None, f"plain SGD can move the adapter without bound ({why})"
        return cls(schedule, t.optimizer, t.max_grad_norm, t.weight_decay, schedule.steps(max_examples)), ""

    def on(self, round_index: int, params: Mapping[str, torch.Tensor]) -> float:
        """The bound in round ``round_index`` on a change of ``params`` as they start it (their count and norm)."""
        return self.at(round_index, sum(t.numel() for t in params.values()), update_norm(params))

    def at(self, round_index: int, n_values: int, start_norm: float) -> float:
        """The bound in round ``round_index`` on the L2 change of ``n_values`` values that start at norm
        ``start_norm``."""
        moved = 0.0
        for step in range(self.steps):
            lr = self.schedule.lr_at(round_index, step, self.steps)
            if self.optimizer == "adamw":
                push = adam_step_ratio(step + 1) * math.sqrt(n_values)
            elif self.optimizer == "zo_sgd":  # |g| <= zo_clip along z, ‖z‖ <= √n + 10 (see the class)
                assert self.max_grad_norm is not None
                push = self.max_grad_norm * (math.sqrt(n_values) + 10)
            else:
                assert self.max_grad_norm is not None
                push = self.max_grad_norm
            moved += lr * (push + self.weight_decay * (start_norm + moved))
        return 1.05 * moved
