"""The ``compare`` config section: named variants of one config, each run with several seeds.

``fedtune compare CONFIG`` reads it (docs/compare.md); ``fedtune run`` refuses a config that has variants,
so a comparison is never run as one experiment by mistake.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, field_validator

from fedtune.config.base import Strict


class CompareConfig(Strict):
    """fedtune compare: variants of this config side by side, each over several seeds."""

    variants: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="variant name -> dotted overrides of this config, e.g. {int4: {compression.uplink: [int4]}, "
        "kd: {paradigm: kd}}; {} runs the config as it is",
    )
    seeds: int = Field(
        3,
        ge=1,
        le=100,
        description="runs per variant, with seeds seed, seed+1, ...: they vary the initial adapter, client "
        "sampling and batch order; the data split and the evaluation set stay those of the first seed",
    )
    target_loss: float | None = Field(
        None, gt=0, description="report the rounds each variant takes to reach this eval loss (eval every round)"
    )

    @field_validator("variants")
    @classmethod
    def _names(cls, variants: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name, overrides in variants.items():
            if not name.strip() or len(name) > 80 or any(c in name for c in "/\\\n\r\t"):
                raise ValueError(f"variant name {name!r}: 1-80 characters, no slashes or line breaks")
            bad = [k for k in overrides if k.split(".")[0] in ("compare", "output", "seed")]
            if bad:
                raise ValueError(
                    f"variant {name!r} sets {', '.join(bad)}: a comparison owns seeds and output places; set "
                    "compare.seeds, or seed and output.* at the top level for every variant"
                )
        slugs = [slug(n) for n in variants]
        clash = sorted({n for n, s in zip(variants, slugs, strict=True) if slugs.count(s) > 1})
        if clash:
            raise ValueError(f"variant names {clash} make the same run directory name; rename one")
        return variants


def slug(name: str) -> str:
    """A variant's name as a directory name: letters, digits, '.' and '-' kept, each run of others one '_'."""
    return re.sub(r"[^A-Za-z0-9.\-]+", "_", name).strip("._-") or "variant"
