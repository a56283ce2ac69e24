"""What a client holds locally: its training sequences, held-out set, and how it evaluates."""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.data.tokenize import Encoded
from fedtune.evaluation.harness import EvalSet


@dataclass(frozen=True)
class ClientData:
    """One client's local share: training sequences and an optional held-out set."""

    train: list[Encoded]
    holdout: EvalSet | None = None

    @property
    def num_tokens(self) -> int:
        return sum(e.num_target_tokens for e in self.train)


@dataclass(frozen=True)
class EvalSettings:
    batch_size: int = 16
    exact: bool = False
    max_new_tokens: int = 24
    group_by: str | None = None
    exact_only_at: int | None = None  # evaluation.exact_match=final: the last round, the only one with exact-match

    def exact_at(self, r: int) -> bool:
        """Whether an evaluation after round ``r`` computes exact-match."""
        return self.exact and (self.exact_only_at is None or r == self.exact_only_at)
