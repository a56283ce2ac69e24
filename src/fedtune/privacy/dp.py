"""Client-level DP for parameter sharing: DP-FedAvg's noised mean (McMahan et al. 2018), as an aggregator.

Each round, with clipping norm C, noise multiplier z and a fixed denominator D (the expected number of
sampled clients, ``q·N``, under Poisson sampling; the sample size ``m`` under fixed-size sampling):

    Δ = ( Σ_i clip(Δ_i, C) + N(0, (z_Δ·C)² I) ) / D,      clip(v, C) = v · min(1, C / ‖v‖₂)

then Δ goes to the server optimizer like any combined update. Every client counts the same (the
sensitivity of the sum is C whatever a client's data size), and D does not depend on who replied,
as the analysis requires: a client that drops adds nothing, it does not shrink the denominator.

Adaptive clipping (Andrew et al. 2021, geometric update): each client's update also yields the bit
b_i = [‖Δ_i‖ ≤ C]; the server releases b̃ = (Σ b_i + N(0, σ_b²)) / D and sets C ← C·exp(−η_C (b̃ − γ))
for a target quantile γ. Both releases together cost what one Gaussian mechanism of multiplier z
costs when the update's multiplier is z_Δ = (z⁻² − (2σ_b)⁻²)^(-1/2) (``accounting.adaptive_noise_split``),
so the accountant is told z. Without adaptive clipping z_Δ = z.

``GaussianMean`` is a combine stage of the aggregation pipeline (``aggregation.pipeline``): clip, noised
fixed-denominator sum, then whatever server optimizer the config names (sgd η=1 is DP-FedAvg, the others
DP-FedOpt). The noise of round r comes from a generator keyed by (noise seed, r), both in the state, so
resume replays it bit for bit and no two rounds draw the same noise. Only noised quantities reach metrics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from fedtune.aggregation.base import Contribution
from fedtune.aggregation.clipping import update_norm
from fedtune.core import rng
from fedtune.core.types import Params
from fedtune.privacy.accounting import adaptive_noise_split, default_count_noise


@dataclass(frozen=True)
class AdaptiveClip:
    """Andrew et al. 2021: track the ``target_quantile`` of update norms with a noised count."""

    target_quantile: float = 0.5  # γ: the share of updates that should end up unclipped
    lr: float = 0.2  # η_C: geometric step
    count_noise: float | None = None  # σ_b; default ``accounting.default_count_noise``


class DpState(NamedTuple):
    clip_norm: float  # C used by the next round
    rounds: int = 0  # rounds noised so far
    noise_seed: int = 0
    unclipped: float = math.nan  # the last round's noised share of updates at or under C (adaptive only)
    last_clip_norm: float = math.nan  # the C the last round used, for its metrics


class GaussianMean:
    """DP-FedAvg's clipped, noised, fixed-denominator mean of client updates: a combine stage."""

    def __init__(
        self,
        noise_multiplier: float,
        clip_norm: float,
        denominator: float,
        seed: int,
        adaptive: AdaptiveClip | None = None,
    ):
        if not clip_norm > 0 or not denominator > 0 or not noise_multiplier >= 0:
            raise ValueError(f"need C > 0, D > 0, z >= 0; got C={clip_norm}, D={denominator}, z={noise_multiplier}")
        self.z, self.clip_norm, self.denominator, self.seed = noise_multiplier, clip_norm, denominator, seed
        self.adaptive = adaptive
        self.count_noise = None
        self.update_z = noise_multiplier
        if adaptive is not None:
            self.count_noise = adaptive.count_noise or default_count_noise(denominator, noise_multiplier)
            self.update_z = adaptive_noise_split(noise_multiplier, self.count_noise) if noise_multiplier > 0 else 0.0

    def init(self) -> DpState:
        return DpState(self.clip_norm, 0, self.seed)

    def combine(self, params: Params, contributions: Sequence[Contribution], state: DpState) -> tuple[Params, DpState]:
        """(Δ, new state): the noised mean of ``contributions`` (shaped like ``params``) for round state.rounds+1."""
        c_norm = state.clip_norm
        total = {k: torch.zeros(v.shape, dtype=torch.float32) for k, v in params.items()}
        unclipped = 0
        for contribution in sorted(contributions, key=lambda c: c.client_id):
            norm = update_norm(contribution.delta)
            scale = min(1.0, c_norm / norm) if norm > 0 else 1.0
            unclipped += norm <= c_norm
            for k in total:
                total[k].add_(contribution.delta[k].to(torch.float32), alpha=scale)
        return self._noised(params, total, state, unclipped, add_noise=True)

    def of_sum(self, params: Params, total: Params, count: int, state: DpState, noised: bool) -> tuple[Params, DpState]:
        """(Δ, new state) from a sum of updates already clipped to state.clip_norm (by the clients, under
        secure aggregation); ``noised``: the clients added their shares of the noise (distributed DP)."""
        return self._noised(params, total, state, None, add_noise=not noised)

    def _noised(
        self, params: Params, total: Params, state: DpState, unclipped: int | None, add_noise: bool
    ) -> tuple[Params, DpState]:
        r = state.rounds + 1
        g = rng.torch_generator(rng.DP_NOISE, state.noise_seed, r)
        std = self.update_z * state.clip_norm if add_noise else 0.0
        mean = {}
        for k in sorted(total):  # (shape of params[k]) — one draw per coordinate, in key order
            value = total[k].to(torch.float32)
            if std:
                value = value + std * torch.randn(value.shape, generator=g, dtype=torch.float32)
            mean[k] = value / self.denominator
        new = state._replace(rounds=r, last_clip_norm=state.clip_norm)
        if self.adaptive is not None:
            if unclipped is None:
                raise ValueError("adaptive clipping needs the count of unclipped updates")
            assert self.count_noise is not None
            count = unclipped + self.count_noise * float(torch.randn((), generator=g, dtype=torch.float64))
            share = count / self.denominator
            c_next = state.clip_norm * math.exp(-self.adaptive.lr * (share - self.adaptive.target_quantile))
            new = new._replace(clip_norm=c_next, unclipped=share)
        return {k: mean[k] for k in params}, new

    def metrics(self, state: DpState) -> dict[str, float]:
        """What may be published: the norm the last round used, the noise std per coordinate of Δ, the noised count."""
        if state.rounds == 0:
            return {}
        out = {
            "dp_clip_norm": state.last_clip_norm,
            "dp_noise_std": self.update_z * state.last_clip_norm / self.denominator,
        }
        if self.adaptive is not None:
            out["dp_unclipped_share"] = state.unclipped
        return out
