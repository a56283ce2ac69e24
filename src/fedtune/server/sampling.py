"""Which clients take part in a round: seeded by (seed, round) alone, so resume replays it."""

from __future__ import annotations

import numpy as np


def sample_clients(num_clients: int, per_round: int, seed: int, round_index: int) -> list[int]:
    if per_round >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, round_index, 0x5A3])
    return sorted(rng.choice(num_clients, size=per_round, replace=False).tolist())
