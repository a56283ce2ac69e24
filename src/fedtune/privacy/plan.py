"""A run's client-level DP plan from its config: the mechanism, the noise, and how many rounds the budget allows.

Made once per run (``assembly`` plans it and hands it to the paradigm, the round loop and the summary;
again, identically, on resume): calibrating z or finding the last round within ``target_epsilon``
depends only on the config, so a resumed run makes the same plan.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Any

from fedtune.config.privacy import PrivacyConfig
from fedtune.core.errors import ConfigError
from fedtune.privacy.accounting import (
    Mechanism,
    adaptive_noise_split,
    calibrate_noise,
    default_count_noise,
    rounds_within,
)
from fedtune.privacy.dp import AdaptiveClip, GaussianMean


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

    def mean(self, noise_seed: int | None) -> GaussianMean:
        """DP-FedAvg's combine stage: the clipped, noised, fixed-denominator mean (the aggregation pipeline puts
        the server optimizer after it). ``noise_seed`` None: a secret one from the OS."""
        m = self.mechanism
        seed = secrets.randbits(63) if noise_seed is None else noise_seed
        return GaussianMean(m.noise_multiplier, self.clip_norm, m.sample_size, seed, self.adaptive)

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


def plan_privacy(p: PrivacyConfig, n: int, m: int, planned: int) -> PrivacyPlan | None:
    """The plan for ``n`` clients, ``m`` expected per round and ``planned`` rounds (federation.rounds), or None
    without client-level DP; ConfigError when the budget cannot be met."""
    if not p.on():
        return None
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
