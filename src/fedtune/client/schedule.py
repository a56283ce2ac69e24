"""Learning-rate schedules that follow the federation's global step across rounds.

Peer frameworks restart the schedule every round because local training is split into
rounds; here scope='federation' places local step s of round r at global step
(r - 1) * S + s of R * S (S steps per round, R rounds), which under full participation is
exactly the client's own global step. scope='round' restarts each round, on request.
"""

from __future__ import annotations

import math


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
