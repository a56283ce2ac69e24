"""A search space as Optuna sees it, and one trial's config: the base with the trial's values set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedtune.compare.plan import base_raw
from fedtune.config import ExperimentConfig, set_dotted, validate_config
from fedtune.config.tune import Dimension


def distributions(space: dict[str, Dimension]) -> dict[str, Any]:
    """Optuna's distribution of every searched key."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for key, d in space.items():
        if d.choices is not None:
            out[key] = CategoricalDistribution(d.choices)
        elif d.integer():
            out[key] = IntDistribution(int(d.low), int(d.high), log=d.log)  # type: ignore[arg-type]
        else:
            out[key] = FloatDistribution(float(d.low), float(d.high), log=d.log)  # type: ignore[arg-type]
    return out


def trial_config(base: ExperimentConfig, params: dict[str, Any], run_dir: Path) -> ExperimentConfig:
    """``base`` with ``params`` (dotted key -> value) set, run in ``run_dir``; ConfigError naming a bad value."""
    raw = base_raw(base, "tune", "compare")
    for key, value in params.items():
        set_dotted(raw, key, value, f"tune.space {key}")
    raw.setdefault("output", {})["dir"] = str(run_dir.parent)
    raw["output"]["name"] = run_dir.name
    return validate_config(raw, f"tune trial {run_dir.name} ({params})")
