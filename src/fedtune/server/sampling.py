"""Which clients take part in a round: seeded by (seed, round) alone, so resume replays it.

Fixed-size: ``per_round`` clients drawn without replacement. Poisson: each client independently with
probability ``rate``, so a round may hold any number of clients, none included (what client-level DP's
Poisson-sampled accounting assumes).
"""

from __future__ import annotations

import numpy as np

from fedtune.core import rng


def sample_clients(num_clients: int, per_round: int, seed: int, round_index: int) -> list[int]:
    if per_round >= num_clients:
        return list(range(num_clients))
    draws = rng.numpy_rng(rng.SAMPLING, seed, round_index)
    return sorted(draws.choice(num_clients, size=per_round, replace=False).tolist())


def poisson_sample(num_clients: int, rate: float, seed: int, round_index: int) -> list[int]:
    if not 0 < rate <= 1:
        raise ValueError(f"a Poisson sampling rate must be in (0, 1], got {rate}")
    draws = rng.numpy_rng(rng.POISSON, seed, round_index)
    return np.flatnonzero(draws.random(num_clients) < rate).tolist()
