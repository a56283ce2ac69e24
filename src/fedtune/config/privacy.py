"""The ``privacy`` config section: client-level differential privacy (DP-FedAvg) with an accountant.

docs/privacy.md has the threat model, the formulas and what each setting protects.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fedtune.config.base import Strict


class AdaptiveClipConfig(Strict):
    """Adaptive clipping (Andrew et al. 2021): the clipping norm follows a quantile of the update norms."""

    target_quantile: float = Field(0.5, gt=0, lt=1, description="γ: the share of updates meant to be unclipped")
    lr: float = Field(0.2, gt=0, description="η_C: C ← C·exp(−η_C (noised unclipped share − γ)) each round")
    count_noise: float | None = Field(
        None,
        gt=0,
        description="σ_b: noise std of the count of unclipped updates (default: expected clients per round / 20, at "
        "least noise_multiplier); must exceed noise_multiplier / 2, and the update's noise grows to keep the total "
        "at noise_multiplier",
    )


class SecureAggregationConfig(Strict):
    """Secure aggregation (Bonawitz et al. 2017): the server learns only the sum of the round's updates."""

    threshold: float = Field(
        0.67,
        gt=0.5,
        le=1,
        description="share of a round's sampled clients (at least 2) that must remain at every step of the protocol; "
        "fewer and the round's update is skipped rather than reveal anything. Above 1/2, so no two disjoint groups "
        "can unmask",
    )
    range: float | None = Field(
        None,
        gt=0,
        description="every value of an update is clipped to [-range, range] before fixed-point encoding (the count "
        "clipped is reported). Default: privacy.clip_norm x (1 + 8 x noise multiplier) with client-level DP, else 1",
    )
    precision_bits: int = Field(16, ge=1, le=40, description="fractional bits of the fixed-point encoding")


class DpSgdConfig(Strict):
    """Sample-level DP-SGD inside each client (Abadi et al. 2016), through Opacus."""

    noise_multiplier: float = Field(
        1.0, gt=0, description="σ: noise std σ·max_grad_norm on each step's summed gradient"
    )
    max_grad_norm: float = Field(1.0, gt=0, description="each example's gradient is clipped to this L2 norm")
    delta: float = Field(1e-5, gt=0, lt=1, description="δ of each client's record-level (ε, δ); below 1 / its examples")
    accountant: Literal["rdp", "pld"] = Field("rdp", description="dp-accounting's accountant for each client's ε")


class PrivacyConfig(Strict):
    """Client-level DP: each client's update clipped to clip_norm, Gaussian noise on the sum, epsilon reported."""

    client_dp: Literal["off", "central", "distributed"] = Field(
        "off",
        description="DP-FedAvg (McMahan et al. 2018), parameter sharing only. central: the (trusted) server clips "
        "each update and adds the noise to the sum; distributed: each client clips its own update and adds a "
        "share of the noise, so it is there before the server sees anything (needs secure_aggregation)",
    )
    clip_norm: float = Field(1.0, gt=0, description="C: every client update is scaled down to this L2 norm")
    noise_multiplier: float | None = Field(
        None, ge=0, description="z: noise std z·C on the sum; unset with target_epsilon: calibrated for the rounds"
    )
    target_epsilon: float | None = Field(
        None,
        gt=0,
        description="epsilon budget at delta: with noise_multiplier, the run stops before the round that would "
        "exceed it; without, noise_multiplier is calibrated so federation.rounds rounds spend it",
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="δ of (ε, δ)-DP; must be below 1 / partition.num_clients")
    accountant: Literal["rdp", "pld"] = Field(
        "rdp", description="dp-accounting's Rényi DP or privacy-loss-distribution accountant (pld: Poisson only)"
    )
    sampling: Literal["poisson", "fixed"] = Field(
        "poisson",
        description="poisson: each client takes part in a round with probability q = clients_per_round / num_clients, "
        "accounted under add-or-remove of one client; fixed: exactly clients_per_round, accounted as sampling "
        "without replacement under replace-one (rdp only)",
    )
    noise_seed: int | None = Field(
        None,
        ge=0,
        description="seed of the noise; unset (the default): drawn from the OS's entropy at the run's start and kept "
        "in its checkpoints, so resume replays it and nobody else can; set it only for experiments, since anyone who "
        "knows it can subtract the noise",
    )
    adaptive_clip: AdaptiveClipConfig | None = Field(
        None, description="adaptive clipping; clip_norm is then the starting norm"
    )
    secure_aggregation: SecureAggregationConfig | None = Field(
        None, description="secure aggregation of the updates ({} for the defaults); parameter sharing only"
    )
    dp_sgd: DpSgdConfig | None = Field(
        None,
        description="record-level DP-SGD in every client's local training ({} for the defaults): examples "
        "Poisson-sampled at rate batch_size / the client's examples, each one's gradient clipped, Gaussian noise; "
        "each client's epsilon reported; parameter sharing only",
    )

    @model_validator(mode="after")
    def _noise_or_budget(self) -> PrivacyConfig:
        if self.client_dp == "off":  # (a saved config lists every key: compare values with the defaults)
            fields = {k: f for k, f in type(self).model_fields.items() if k not in ("secure_aggregation", "dp_sgd")}
            changed = [k for k, f in fields.items() if getattr(self, k) != f.get_default(call_default_factory=True)]
            if changed:
                raise ValueError(
                    f"privacy.{', privacy.'.join(sorted(changed))} apply with privacy.client_dp: central; "
                    "set it, or remove them"
                )
            return self
        if self.client_dp == "distributed" and self.secure_aggregation is None:
            raise ValueError(
                "privacy.client_dp=distributed needs privacy.secure_aggregation: without it the server sees each "
                "update with only its share of the noise (use central, or add secure_aggregation: {})"
            )
        if self.secure_aggregation is not None and self.adaptive_clip is not None:
            raise ValueError(
                "privacy.adaptive_clip does not work with secure_aggregation yet (the unclipped count would have to "
                "be summed securely too); use a fixed privacy.clip_norm"
            )
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError(
                "privacy.client_dp=central needs privacy.noise_multiplier (z; epsilon is then reported every round) "
                "or privacy.target_epsilon (z is then calibrated for federation.rounds), or both"
            )
        if self.sampling == "fixed" and self.accountant == "pld":
            raise ValueError(
                "privacy.accountant=pld cannot account fixed-size sampling (dp-accounting's PLD accountant does not "
                "support sampling without replacement): use accountant rdp, or sampling poisson"
            )
        return self

    def on(self) -> bool:
        """Client-level DP is on."""
        return self.client_dp != "off"

    def any(self) -> bool:
        """Client-level DP, secure aggregation or DP-SGD is on."""
        return self.on() or self.secure_aggregation is not None or self.dp_sgd is not None
