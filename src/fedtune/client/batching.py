"""Which local examples form each micro-batch of a round: by steps or by epochs, seeded."""

from __future__ import annotations

import math

import numpy as np


def batch_count(
    num_examples: int, batch_size: int, grad_accum: int, local_steps: int | None, local_epochs: float | None
) -> int:
    """How many micro-batches a round has: steps * grad_accum, or ceil(epochs * n / batch_size) (at least 1)."""
    if local_steps is not None:
        return local_steps * grad_accum
    if local_epochs is not None:
        return max(1, math.ceil(local_epochs * num_examples / batch_size))
    raise ValueError("give local_steps or local_epochs")


def micro_batches(
    num_examples: int,
    batch_size: int,
    grad_accum: int,
    rng: np.random.Generator,
    local_steps: int | None = None,
    local_epochs: float | None = None,
) -> list[np.ndarray]:
    """Index arrays, one per micro-batch; optimizer steps = ceil(len / grad_accum).

    Steps mode draws steps * grad_accum batches from back-to-back shuffled passes over the data.
    Epochs mode covers ceil(epochs * n / batch_size) batches the same way.
    """
    n_batches = batch_count(num_examples, batch_size, grad_accum, local_steps, local_epochs)
    need = n_batches * batch_size
    order = np.concatenate([rng.permutation(num_examples) for _ in range(math.ceil(need / num_examples))])
    batches = [order[i * batch_size : (i + 1) * batch_size] for i in range(n_batches)]
    if local_epochs is not None:  # the last batch of an epoch run may be short
        covered = math.ceil(local_epochs * num_examples)
        batches[-1] = batches[-1][: covered - (n_batches - 1) * batch_size]
    return batches


def poisson_batches(num_examples: int, batch_size: int, steps: int, rng: np.random.Generator) -> list[np.ndarray]:
    """DP-SGD's batches: at each of ``steps`` steps every example independently with probability
    batch_size / num_examples (capped at 1), so a batch may be of any size, empty included."""
    rate = min(1.0, batch_size / max(1, num_examples))
    return [np.flatnonzero(rng.random(num_examples) < rate) for _ in range(steps)]
