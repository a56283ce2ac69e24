"""How much each client's update counts: by examples (default), target tokens, or uniformly."""

from __future__ import annotations

import math


def client_weight(num_examples: int, num_tokens: int, scheme: str) -> float:
    """The weight of a client that trained on ``num_examples`` examples with ``num_tokens`` target tokens."""
    if scheme == "examples":
        weight = float(num_examples)
    elif scheme == "tokens":
        weight = float(num_tokens)
    elif scheme == "uniform":
        return 1.0
    else:
        raise ValueError(f"aggregation.weighting={scheme!r}; allowed: examples, tokens, uniform")
    if not (math.isfinite(weight) and weight > 0):
        raise ValueError(f"a client's {scheme} weight must be a positive number, got {weight}")
    return weight
