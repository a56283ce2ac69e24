"""What a client-level DP run tells its accountant, and the epsilon that Google's ``dp-accounting`` returns.

One round of DP-FedAvg (McMahan et al. 2018) is a sampled Gaussian mechanism on the sum of clipped
client updates: noise std ``z·C`` against sensitivity ``C``, so the accountant needs only the noise
multiplier ``z``, how clients were sampled and the neighbouring relation:

- Poisson sampling (each client in a round with probability ``q``, independently) under add-or-remove
  of one client: ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``, RDP or PLD accounting;
- fixed-size sampling (``m`` of ``N`` without replacement) under replace-one of a client:
  ``SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(z / 2))``, RDP accounting only (the PLD
  accountant of dp-accounting does not support it). Replacing a client moves the sum of clipped
  updates by up to 2C (‖a − b‖ ≤ ‖a‖ + ‖b‖), and dp-accounting's multiplier is the noise std over the
  sensitivity under the relation used (Wang, Balle and Kasiviswanathan 2019), so it is told z / 2.

Rounds compose: ``SelfComposedDpEvent(event, rounds)``. ``Mechanism.describe()`` is what a run logs,
so anyone can recompute its epsilon with the library directly.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

log = logging.getLogger(__name__)

Sampling = Literal["poisson", "fixed"]
AccountantName = Literal["rdp", "pld"]


def _dpa():
    import dp_accounting  # imported when DP is used: it pulls in scipy

    logging.getLogger("absl").setLevel(logging.ERROR)  # RDP orders that fail to converge are skipped, loudly
    return dp_accounting


@dataclass(frozen=True)
class Mechanism:
    """One round's sampled Gaussian mechanism, as the accountant is told it."""

    noise_multiplier: float  # z: noise std over the clipping norm
    sampling: Sampling
    population: int  # N: clients in the federation
    sample_size: int  # fixed: m clients a round; poisson: the expected count the mean divides by
    delta: float
    accountant: AccountantName = "rdp"

    def __post_init__(self) -> None:
        if not self.noise_multiplier >= 0 or not math.isfinite(self.noise_multiplier):
            raise ValueError(f"noise multiplier must be finite and >= 0, got {self.noise_multiplier}")
        if not 1 <= self.sample_size <= self.population:
            raise ValueError(f"sample size {self.sample_size} must be in 1..{self.population} (the federation)")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if self.sampling == "fixed" and self.accountant == "pld":
            raise ValueError(
                "the PLD accountant (dp-accounting) does not support fixed-size sampling without replacement; "
                "use accountant rdp, or Poisson sampling"
            )

    @property
    def sample_rate(self) -> float:
        """q: the probability that a given client takes part in a round."""
        return self.sample_size / self.population

    @property
    def neighbouring(self) -> str:
        return "add_or_remove_one" if self.sampling == "poisson" else "replace_one"

    @property
    def sensitivity(self) -> float:
        """How far one neighbouring change moves the sum of updates clipped to C, in units of C."""
        return 1.0 if self.sampling == "poisson" else 2.0

    def event(self, rounds: int):
        """The dp-accounting event of ``rounds`` rounds."""
        dpa = _dpa()
        gaussian = dpa.GaussianDpEvent(self.noise_multiplier / self.sensitivity)
        if self.sampling == "poisson":
            one = dpa.PoissonSampledDpEvent(self.sample_rate, gaussian)
        else:
            one = dpa.SampledWithoutReplacementDpEvent(self.population, self.sample_size, gaussian)
        return dpa.SelfComposedDpEvent(one, rounds)

    def accountant_for(self):
        dpa = _dpa()
        relation = (
            dpa.NeighboringRelation.ADD_OR_REMOVE_ONE
            if self.sampling == "poisson"
            else dpa.NeighboringRelation.REPLACE_ONE
        )
        if self.accountant == "pld":
            return dpa.pld.PLDAccountant(neighboring_relation=relation)
        return dpa.rdp.RdpAccountant(neighboring_relation=relation)

    def epsilon(self, rounds: int) -> float:
        """Epsilon at ``delta`` after ``rounds`` rounds (0 rounds: 0; no noise: inf)."""
        if rounds <= 0:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        accountant = self.accountant_for()
        accountant.compose(self.event(rounds))
        return float(accountant.get_epsilon(self.delta))

    def describe(self, rounds: int | None = None) -> dict[str, Any]:
        """What the accountant is told: enough to recompute the epsilon with dp-accounting alone."""
        out: dict[str, Any] = {
            "accountant": f"dp-accounting {self.accountant.upper()}",
            "mechanism": "sampled Gaussian on the sum of client updates clipped to L2 norm C, noise std z*C",
            "noise_multiplier": self.noise_multiplier,
            "sensitivity": f"{self.sensitivity:g}C",
            "accountant_noise_multiplier": self.noise_multiplier / self.sensitivity,
            "sampling": self.sampling,
            "sample_rate": self.sample_rate,
            "population": self.population,
            "sample_size": self.sample_size,
            "neighbouring": self.neighbouring,
            "delta": self.delta,
        }
        if rounds is not None:
            out["rounds"] = rounds
        return out

    def with_noise(self, z: float) -> Mechanism:
        return Mechanism(z, self.sampling, self.population, self.sample_size, self.delta, self.accountant)


def rounds_within(mechanism: Mechanism, target_epsilon: float, max_rounds: int) -> int:
    """The most rounds (<= ``max_rounds``) whose epsilon stays at or below ``target_epsilon``."""
    lo, hi = 0, max_rounds  # epsilon grows with rounds: binary search for the last round within the target
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if mechanism.epsilon(mid) <= target_epsilon:
            lo = mid
        else:
            hi = mid - 1
    return lo


def calibrate_noise(mechanism: Mechanism, rounds: int, target_epsilon: float) -> float:
    """The smallest noise multiplier whose epsilon after ``rounds`` rounds is at most ``target_epsilon``."""
    if rounds < 1 or not target_epsilon > 0:
        raise ValueError(f"calibrating needs rounds >= 1 and target epsilon > 0, got {rounds} and {target_epsilon}")
    dpa = _dpa()
    z = dpa.calibrate_dp_mechanism(
        mechanism.accountant_for,
        lambda z: mechanism.with_noise(z).event(rounds),
        target_epsilon,
        mechanism.delta,
        dpa.LowerEndpointAndGuess(1e-3, 1.0),
        tol=1e-4,
    )
    return float(z)


def adaptive_noise_split(noise_multiplier: float, count_noise: float) -> float:
    """Andrew et al. 2021: the update's noise multiplier when the clipped-count estimate uses ``count_noise``.

    Releasing both the noised sum (multiplier z_Δ) and the noised count of unclipped updates (std σ_b,
    sensitivity 1/2 per client after centring) costs what one Gaussian mechanism of multiplier z costs,
    when z_Δ = (z⁻² − (2σ_b)⁻²)^(-1/2). So the accountant is told z, and the update gets z_Δ > z.
    """
    if count_noise <= 0:
        raise ValueError(f"the clipped-count noise must be > 0, got {count_noise}")
    rest = noise_multiplier**-2 - (2 * count_noise) ** -2
    if rest <= 0:
        raise ValueError(
            f"clipped-count noise {count_noise} is too small for noise multiplier {noise_multiplier}: "
            f"it needs more than z/2 = {noise_multiplier / 2:.4g}"
        )
    return rest**-0.5


def default_count_noise(expected_clients: float, noise_multiplier: float) -> float:
    """σ_b when unset: Andrew et al.'s expected clients / 20, but at least z, so the update's noise grows by at
    most 1/√(3/4) ≈ 1.15x (a small federation's m/20 would be below the z/2 that the split needs)."""
    return max(expected_clients / 20, noise_multiplier)


@dataclass(frozen=True)
class SampleLevel:
    """DP-SGD's accounting for one client (add-or-remove of one of its examples): each local step is a
    Poisson-sampled Gaussian mechanism at rate batch_size / its examples; steps compose over its rounds."""

    noise_multiplier: float
    batch_size: int
    steps_per_round: int
    delta: float
    accountant: AccountantName = "rdp"

    @cache  # noqa: B019 (frozen and small: one entry per (examples, rounds) seen)
    def epsilon(self, examples: int, rounds: int) -> float:
        """Epsilon at delta of a client with ``examples`` examples after training in ``rounds`` rounds."""
        if rounds <= 0:
            return 0.0
        dpa = _dpa()
        rate = min(1.0, self.batch_size / max(1, examples))
        one = dpa.PoissonSampledDpEvent(rate, dpa.GaussianDpEvent(self.noise_multiplier))
        relation = dpa.NeighboringRelation.ADD_OR_REMOVE_ONE
        acc = (
            dpa.pld.PLDAccountant(neighboring_relation=relation)
            if self.accountant == "pld"
            else dpa.rdp.RdpAccountant(neighboring_relation=relation)
        )
        acc.compose(dpa.SelfComposedDpEvent(one, self.steps_per_round * rounds))
        return float(acc.get_epsilon(self.delta))
