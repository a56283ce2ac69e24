"""FedKSeed's settings (``paradigm: {name: fedkseed, ...}``): the candidate seeds a client's steps choose from.

docs/algorithms/zeroth_order.md has the formulas.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from fedtune.config.paradigm import ParadigmConfig

if TYPE_CHECKING:
    from fedtune.config.experiment import ExperimentConfig

CANDIDATES_TAG = 0x4B5EED  # the candidate seeds' key after the run's seed


class FedKSeedConfig(ParadigmConfig):
    """FedKSeed (paradigm fedkseed): zeroth-order steps along K candidate seeds, sent as (index, scalar) pairs."""

    candidates: int = Field(
        4096, ge=1, le=2**20, description="K: the seeds a step's direction is chosen from (FedKSeed's 4096)"
    )
    sampling: Literal["uniform", "importance"] = Field(
        "uniform",
        description="how a step picks its candidate: uniform (FedKSeed), or importance (FedKSeed-Pro: in proportion "
        "to softmax of each candidate's min-max-scaled mean |amount| over the global steps so far, which every "
        "client works out from the steps it replays: no extra bytes)",
    )


def candidate_seeds(seed: int, k: int) -> list[int]:
    """The K direction seeds of a run: a function of its seed, the same for the server and every client."""
    return [int(s) for s in np.random.default_rng([seed, CANDIDATES_TAG]).integers(0, 2**63 - 1, size=k)]


def check(cfg: ExperimentConfig) -> None:
    """A FedKSeed client's steps are zeroth-order ones: the config must say so."""
    if cfg.training.gradient != "zeroth_order":
        raise ValueError(
            "paradigm fedkseed trains by zeroth-order steps: set training.gradient=zeroth_order (and a learning "
            "rate for it, docs/algorithms/zeroth_order.md)"
        )
