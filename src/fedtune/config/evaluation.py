"""The ``evaluation`` section: held-out evaluation of the federation's model(s)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fedtune.config.base import Strict


class EvaluationConfig(Strict):
    """Held-out evaluation of the global model."""

    every: int = Field(1, ge=0, description="evaluate every N rounds (0: only at the end)")
    at_start: bool = Field(True, description="evaluate the base model as round 0")
    max_samples: int | None = Field(None, ge=1, description="cap on held-out examples")
    batch_size: int = Field(16, ge=1, description="sequences per evaluation batch")
    exact_match: Literal["auto", True, False, "final"] = Field(
        "auto",
        description="greedy-generation exact-match accuracy; auto: on for the built-in data; final: only after "
        "the last round (the loss is still evaluated every time: generation is most of an evaluation's cost)",
    )
    max_new_tokens: int = Field(24, ge=1, description="greedy generation length for exact-match")
    group_by: str | None = Field("task", description="report accuracy per value of this field, if present")
    per_client: bool = Field(False, description="also evaluate on each client's held-out share")
