"""How much each client's update counts: by examples (default), target tokens, or uniformly."""

from __future__ import annotations

from fedtune.types import TrainReply


def client_weight(reply: TrainReply, scheme: str) -> float:
    if scheme == "examples":
        return float(reply.num_examples)
    if scheme == "tokens":
        return float(reply.num_tokens)
    if scheme == "uniform":
        return 1.0
    raise ValueError(f"aggregation.weighting={scheme!r}; allowed: examples, tokens, uniform")
