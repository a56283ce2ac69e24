"""Personalised FL's settings (``paradigm: {name: personalised, ...}``): the method and what stays with a client.

docs/algorithms/personalised.md has the formulas.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator

from fedtune.config.paradigm import ParadigmConfig

if TYPE_CHECKING:
    from fedtune.config.experiment import ExperimentConfig

SPLITTING = ("fedper", "fedrep")  # methods that share part of the adapter and keep the rest on each client


class PersonalisedConfig(ParadigmConfig):
    """Personalised FL (paradigm personalised): every client keeps a personal adapter beside the federation's."""

    method: Literal["fedper", "fedrep", "ditto", "pfedme"] = Field(
        "ditto",
        description="fedper: the adapter's personal part stays on each client, the rest is shared, both train "
        "together; fedrep: the same split, the personal part trained first with the shared part frozen, then the "
        "shared part; ditto: the global adapter trained as in FedAvg, and a personal one regularised toward it; "
        "pfedme: a personal adapter regularised toward the client's local copy, which moves toward it and is sent",
    )
    personal_blocks: int = Field(
        1,
        ge=1,
        description="fedper/fedrep: the adapter tensors of the last N decoder blocks that carry any stay personal",
    )
    personal_keys: str | None = Field(
        None,
        description="fedper/fedrep: a regular expression; adapter tensors whose names it matches (re.search) stay "
        "personal, instead of personal_blocks; a LoRA module's A and B must fall on one side",
    )
    personal_steps: int | None = Field(
        None,
        ge=1,
        description="fedrep: of training.local_steps, the first N train the personal part alone (default: half); "
        "ditto: steps training the personal adapter each round (default: training.local_steps); pfedme: steps of "
        "the personal adapter between moves of the local copy (default 1)",
    )
    lam: float = Field(
        1.0,
        gt=0,
        description="ditto/pfedme: λ, the pull λ/2·‖v − w‖² of the personal adapter v toward the global (ditto) or "
        "local (pfedme) one",
    )
    eta: float = Field(
        0.5,
        gt=0,
        description="pfedme: the local copy's step w ← w − η·λ·(w − θ) toward the personal adapter θ (η·λ <= 1)",
    )

    @field_validator("personal_keys")
    @classmethod
    def _pattern(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"personal_keys={value!r} is not a regular expression: {exc}") from None
        return value

    def splits(self) -> bool:
        """Whether the adapter is split into a shared and a personal part (FedPer, FedRep)."""
        return self.method in SPLITTING

    def steps_of(self, local_steps: int | None) -> int:
        """``personal_steps`` as the method uses it, defaults resolved."""
        if self.personal_steps is not None:
            return self.personal_steps
        if self.method == "fedrep":
            return max(1, (local_steps or 2) // 2)
        if self.method == "ditto":
            return local_steps or 1
        return 1


def check(cfg: ExperimentConfig) -> None:
    """Rules the methods add, each naming the key to change."""
    s: PersonalisedConfig = cfg.paradigm  # type: ignore[assignment]
    t, key = cfg.training, "paradigm.personal_steps"
    if not cfg.evaluation.per_client:
        raise ValueError(
            "paradigm personalised is measured on each client's own held-out share: set evaluation.per_client: true "
            "(and partition.holdout_fraction, e.g. 0.1)"
        )
    changed = {k for k, f in type(s).model_fields.items() if getattr(s, k) != f.default}  # a saved config sets all
    if not s.splits():
        for name in ("personal_blocks", "personal_keys"):
            if name in changed:
                raise ValueError(f"paradigm.{name} applies to methods fedper and fedrep, not {s.method}")
    if s.method == "fedper" and s.personal_steps is not None:
        raise ValueError(f"{key} does not apply to fedper (both parts train together); remove it")
    if s.method != "pfedme" and "eta" in changed:
        raise ValueError(f"paradigm.eta applies to pfedme, not {s.method}")
    if s.method in SPLITTING and "lam" in changed:
        raise ValueError(f"paradigm.lam applies to ditto and pfedme, not {s.method}")
    if s.method == "fedrep":
        if t.local_steps is None:
            raise ValueError("fedrep splits training.local_steps between the two parts: set training.local_steps")
        if s.steps_of(t.local_steps) >= t.local_steps:
            raise ValueError(
                f"{key}={s.steps_of(t.local_steps)} leaves none of training.local_steps={t.local_steps} for the "
                "shared part; give it fewer"
            )
    if s.method == "pfedme" and s.eta * s.lam > 1:
        raise ValueError(f"paradigm.eta·lam = {s.eta * s.lam:g} > 1 overshoots the personal adapter; lower eta")
    if cfg.aggregation.scaffold:
        raise ValueError("paradigm personalised does not take SCAFFOLD's control variates (aggregation.scaffold)")
    if s.method in ("fedrep", "pfedme") and cfg.privacy.dp_sgd is not None:
        raise ValueError(
            f"{s.method} shapes each step (a frozen part, a proximal pull), which DP-SGD's steps do not take: "
            "remove privacy.dp_sgd or use fedper or ditto"
        )
    if s.method == "pfedme" and t.proximal_mu:
        raise ValueError("pfedme's proximal pull is paradigm.lam; remove training.proximal_mu")
