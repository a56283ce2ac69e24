"""The ``tune`` config section: federated hyper-parameter optimisation (``fedtune tune CONFIG``, docs/tune.md).

A search space over dotted config keys, searched by Optuna (random search or TPE), with rounds as the
budget: successive halving or Hyperband stop the trials that trail at a rung after as few as ``min_rounds``.
``fedtune run`` refuses a config whose search space is set, so a search is never run as one experiment.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from fedtune.config.base import Strict

OWNED = ("compare", "output", "seed", "tune", "federation.rounds")  # what a search owns, never a dimension


class Dimension(Strict):
    """One searched key: a range (``low``/``high``, integers when both are, ``log`` for a log scale) or ``choices``."""

    low: float | int | None = Field(None, description="the range's lower end (inclusive)")
    high: float | int | None = Field(None, description="the range's upper end (inclusive)")
    log: bool = Field(False, description="sample the range on a log scale (learning rates)")
    choices: list[Any] | None = Field(None, description="the values to choose from, instead of a range")

    @model_validator(mode="after")
    def _shape(self) -> Dimension:
        if self.choices is not None:
            if self.low is not None or self.high is not None or self.log:
                raise ValueError("give either choices or low/high (and log), not both")
            if not self.choices or len({repr(c) for c in self.choices}) != len(self.choices):
                raise ValueError(f"choices {self.choices}: give one or more distinct values")
            return self
        if self.low is None or self.high is None:
            raise ValueError("give low and high (a range) or choices")
        if not self.low < self.high:
            raise ValueError(f"low={self.low} must be below high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"log=true needs low > 0 (low={self.low})")
        return self

    def integer(self) -> bool:
        return self.choices is None and isinstance(self.low, int) and isinstance(self.high, int)


class TuneConfig(Strict):
    """fedtune tune: a search over this config's keys, with rounds as the budget (docs/tune.md)."""

    space: dict[str, Dimension] = Field(
        default_factory=dict,
        description="dotted key -> its range or choices, e.g. {training.lr: {low: 1e-4, high: 1e-2, log: true}, "
        "adapter.r: {choices: [4, 8, 16]}}",
    )
    trials: int = Field(12, ge=1, le=10_000, description="settings tried (the search's budget with the rounds)")
    sampler: Literal["random", "tpe"] = Field(
        "random",
        description="how settings are drawn: random search, or Optuna's TPE (Bayesian, from the trials so far)",
    )
    scheduler: Literal["none", "successive_halving", "hyperband"] = Field(
        "hyperband",
        description="rounds as the budget: none runs every trial for federation.rounds; successive_halving stops a "
        "trial that is not in the best 1/reduction_factor at a rung (min_rounds · reduction_factor^k rounds); "
        "hyperband runs several such brackets (Optuna's pruners)",
    )
    min_rounds: int = Field(
        1, ge=1, description="the first rung: the fewest rounds a trial runs before it can be stopped"
    )
    reduction_factor: int = Field(3, ge=2, description="successive halving's η: 1/η of a rung's trials go on")
    metric: str = Field(
        "eval_loss",
        description="what the search optimises, a metrics.jsonl key of every evaluated round: eval_loss (the "
        "federation's evaluation set), client_eval_loss_mean (clients' validation loss on their held-out "
        "shares, FS-LLM's; needs evaluation.per_client), or an accuracy (a key ending in accuracy, e.g. "
        "eval_reward_accuracy on preference pairs), which is maximised; anything else is minimised",
    )
    seeds: int = Field(
        0,
        ge=0,
        le=100,
        description="after the search, run the base config and the best setting side by side with this many "
        "seeds (a fedtune compare in the search's final/ directory): the table with intervals; 0: skip",
    )

    @field_validator("space")
    @classmethod
    def _keys(cls, space: dict[str, Dimension]) -> dict[str, Dimension]:
        owned = [k for k in space if any(k == o or k.startswith(o + ".") for o in OWNED)]
        if owned:
            raise ValueError(
                f"tune.space searches {', '.join(owned)}: a search owns seeds, output places and the rounds (its "
                "budget); search other keys"
            )
        return space

    def on(self) -> bool:
        return bool(self.space)

    def direction(self) -> Literal["minimize", "maximize"]:
        """Optuna's direction for ``metric``: an accuracy is maximised, a loss (anything else) minimised."""
        return "maximize" if self.metric.endswith("accuracy") else "minimize"
