"""A comparison as runs: one config per variant and seed, each with its own run directory.

Every run starts from the whole base config (with its command-line overrides), takes its variant's
overrides (dotted keys; a mapping value merges into its section), the seed ``seed + i``, and the
data split seed of the base, so all seeds see the same clients' data and the same evaluation set.
Run directories live under ``<comparison>/runs/<variant>-seed<k>``. Runs go seed by seed, every
variant within a seed, so a comparison stopped early already holds every variant.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.config import ExperimentConfig, set_dotted, validate_config
from fedtune.config.compare import slug
from fedtune.core.errors import ConfigError


@dataclass(frozen=True)
class PlannedRun:
    variant: str
    seed: int
    config: ExperimentConfig

    @property
    def run_dir(self) -> Path:
        return Path(self.config.output.dir) / str(self.config.output.name)


@dataclass(frozen=True)
class Plan:
    base: ExperimentConfig
    directory: Path  # the comparison's directory
    runs: list[PlannedRun]

    @property
    def variants(self) -> list[str]:
        return list(self.base.compare.variants)

    @property
    def seeds(self) -> list[int]:
        return [self.base.seed + i for i in range(self.base.compare.seeds)]

    def of(self, variant: str) -> list[PlannedRun]:
        return [r for r in self.runs if r.variant == variant]


def base_raw(base: ExperimentConfig, *drop: str) -> dict[str, Any]:
    """``base`` as the runs made from it start: only what the user set (and what validation resolved), so an
    override meets the defaults it would meet in a config of its own (e.g. privacy on resolves the weighting a
    full dump would pin), without the sections ``drop`` names, the data split pinned to the base's (every run
    sees the same clients' data and evaluation set)."""
    raw = base.model_dump(mode="json", exclude_unset=True)
    for section in drop:
        raw.pop(section, None)
    raw.setdefault("data", {})["split_seed"] = base.split_seed()
    return raw


def plan(base: ExperimentConfig, directory: Path) -> Plan:
    """Every (variant, seed) run of ``base``'s compare section, validated: a bad variant is a ConfigError
    naming it and the key."""
    if not base.compare.variants:
        raise ConfigError(
            "nothing to compare: add a compare section with variants, e.g.\n"
            "compare:\n  seeds: 3\n  variants:\n    lora: {}\n    int4: {compression.uplink: [int4]}"
        )
    raw = base_raw(base, "compare")
    runs = []
    for i in range(base.compare.seeds):  # seed after seed: a partial comparison already has every variant
        seed = base.seed + i
        for name, overrides in base.compare.variants.items():
            child = copy.deepcopy(raw)
            where = f"compare.variants[{name!r}]"
            for key, value in overrides.items():
                set_dotted(child, key, copy.deepcopy(value), f"{where} {key}", merge=True)
            child["seed"] = seed
            child.setdefault("output", {})["dir"] = str(directory / "runs")
            child["output"]["name"] = f"{slug(name)}-seed{seed}"
            runs.append(PlannedRun(name, seed, validate_config(child, where)))
    return Plan(base, directory, runs)
