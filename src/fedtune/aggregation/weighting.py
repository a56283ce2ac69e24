"""How much each client's update counts: by examples (default), target tokens, or uniformly.

Counts are what a client reports, so they are checked (positive, finite) and capped: a client may
count for at most ``max_examples`` examples, or ``max_examples * max_seq_len`` target tokens (no
example has more), so no report can outweigh the rest of the federation without bound.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightCap:
    """The most a client's data could give: ``max_examples`` examples of at most ``max_seq_len`` tokens."""

    max_examples: int
    max_seq_len: int

    def of(self, scheme: str) -> float:
        return float(self.max_examples * (self.max_seq_len if scheme == "tokens" else 1))


def client_weight(
    num_examples: int, num_tokens: int, scheme: str, cap: WeightCap | None = None, who: str = "a client"
) -> float:
    """The weight of a client that trained on ``num_examples`` examples with ``num_tokens`` target tokens;
    ValueError for a count that is not a positive number, and a larger one than ``cap`` allows counts as the cap."""
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
    limit = cap.of(scheme) if cap is not None else math.inf
    if weight > limit:
        log.warning(
            "%s reported %g %s, more than any client's data can give (federation.max_client_examples=%d); "
            "counted as %g",
            who,
            weight,
            scheme,
            cap.max_examples,
            limit,
        )
        return limit
    return weight
