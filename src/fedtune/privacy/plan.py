"""A run's client-level DP plan from its config: the mechanism, the noise, and how many rounds the budget allows.

Made once before the first round (and again, identically, on resume): calibrating z or finding the
last round within ``target_epsilon`` depends only on the config, so a resumed run makes the same plan.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from fedtune.aggregation import server_optimizer
from fedtune.aggregation.base import Aggregator
from fedtune.aggregation.lora import LoraNaive
from fedtune.config_privacy import PrivacyConfig
from fedtune.errors import ConfigError
from fedtune.privacy.accounting import (
    Mechanism,
    adaptive_noise_split,
    calibrate_noise,
    default_count_noise,
    rounds_within,
)
from fedtune.privacy.dp import AdaptiveClip, DpFedAvg, GaussianMean

if TYPE_CHECKING:
    from fedtune.config import AggregationConfig, ExperimentConfig


@dataclass(frozen=True)
class PrivacyPlan:
    mechanism: Mechanism  # what the accountant is told each round
    clip_norm: float
    adaptive: AdaptiveClip | None
    rounds: int  # rounds the run may take: federation.rounds, or fewer when target_epsilon allows fewer
    planned_rounds: int  # federation.rounds
    target_epsilon: float | None
    calibrated: bool  # z was calibrated from target_epsilon

    @property
    def sampling(self) -> str:
        return self.mechanism.sampling

    def aggregator(self, cfg: AggregationConfig, lora_alpha: float | None, noise_seed: int | None) -> Aggregator:
        """DP-FedAvg (or DP-FedOpt with another server optimizer) reporting epsilon every round; with LoRA
        naive mode, over A and B apart (error reported). ``noise_seed`` None: a secret one from the OS."""
        m = self.mechanism
        seed = secrets.randbits(63) if noise_seed is None else noise_seed
        mean = GaussianMean(m.noise_multiplier, self.clip_norm, m.sample_size, seed, self.adaptive)
        agg: Aggregator = DpFedAvg(f"dp_{cfg.name}", mean, server_optimizer(cfg), self.epsilon)
        if lora_alpha is not None and cfg.lora_mode() == "naive":
            agg = LoraNaive(agg, lora_alpha)
        return agg

    def epsilon(self, rounds: int) -> float:
        return self.mechanism.epsilon(rounds)

    def describe(self) -> dict[str, Any]:
        """What a run logs and keeps in summary.json: enough to recompute its epsilon with dp-accounting."""
        out = {
            **self.mechanism.describe(),
            "clip_norm": self.clip_norm,
            "adaptive_clipping": None if self.adaptive is None else vars(self.adaptive),
            "fixed_denominator": self.mechanism.sample_size,
            "rounds_allowed": self.rounds,
            "rounds_planned": self.planned_rounds,
        }
        if self.target_epsilon is not None:
            out["target_epsilon"] = self.target_epsilon
            out["noise_multiplier_calibrated"] = self.calibrated
        return out

    def summary(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        """summary.json's privacy entry: the plan, and the epsilon spent by the rounds run."""
        spent = [rec["dp_epsilon"] for rec in history if "dp_epsilon" in rec]
        return {**self.describe(), "epsilon": spent[-1] if spent else 0.0, "rounds_noised": len(spent)}


def plan_privacy(cfg: ExperimentConfig) -> PrivacyPlan | None:
    """The plan, or None without client-level DP; ConfigError when the budget cannot be met. Made once per
    distinct setting in a process (calibration runs the accountant dozens of times)."""
    if not cfg.privacy.on():
        return None
    return _plan(
        cfg.privacy.model_dump_json(), cfg.partition.num_clients, cfg.clients_per_round(), cfg.federation.rounds
    )


def rounds_to_run(cfg: ExperimentConfig) -> int:
    """federation.rounds, or fewer when privacy.target_epsilon is spent sooner."""
    plan = plan_privacy(cfg)
    return cfg.federation.rounds if plan is None else plan.rounds


@lru_cache(maxsize=16)
def _plan(privacy_json: str, n: int, m: int, planned: int) -> PrivacyPlan:
    p = PrivacyConfig.model_validate_json(privacy_json)
    mechanism = Mechanism(p.noise_multiplier or 0.0, p.sampling, n, m, p.delta, p.accountant)
    calibrated = p.noise_multiplier is None
    if calibrated:
        assert p.target_epsilon is not None  # the config checks one of the two is set
        mechanism = mechanism.with_noise(calibrate_noise(mechanism, planned, p.target_epsilon))
    rounds = planned
    if p.target_epsilon is not None and not calibrated:
        rounds = rounds_within(mechanism, p.target_epsilon, planned)
        if rounds == 0:
            raise ConfigError(
                f"privacy.target_epsilon={p.target_epsilon} is spent by the first round already "
                f"(epsilon after one round: {mechanism.epsilon(1):.4g}); raise privacy.noise_multiplier "
                f"(now {mechanism.noise_multiplier}) or the target"
            )
    adaptive = None
    if p.adaptive_clip is not None:
        a = p.adaptive_clip
        sigma_b = a.count_noise if a.count_noise is not None else default_count_noise(m, mechanism.noise_multiplier)
        adaptive = AdaptiveClip(a.target_quantile, a.lr, sigma_b)
        try:
            if mechanism.noise_multiplier > 0:
                adaptive_noise_split(mechanism.noise_multiplier, adaptive.count_noise or math.nan)
        except ValueError as exc:
            raise ConfigError(f"privacy.adaptive_clip.count_noise: {exc}") from None
    return PrivacyPlan(mechanism, p.clip_norm, adaptive, rounds, planned, p.target_epsilon, calibrated)
