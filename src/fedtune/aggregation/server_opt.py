"""Server optimizers: apply the round's pseudo-gradient to the global params, as pure (init, update) pairs.

The pseudo-gradient is the combined client delta Δ = combine_k(w_k − w) (a weighted mean for
FedAvg/FedOpt). Following Reddi et al. 2021 (Adaptive Federated Optimization), Δ is a descent
direction already, so every rule adds to w:

  sgd       w ← w + η Δ                                   (FedAvg when η = 1)
  momentum  v ← β v + Δ;  w ← w + η v                     (FedAvgM, Hsu et al. 2019)
  adaptive  m ← β1 m + (1−β1) Δ;  w ← w + η m / (√v + τ), with the second moment v
            adam:    v ← β2 v + (1−β2) Δ²
            yogi:    v ← v − (1−β2) Δ² sign(v − Δ²)
            adagrad: v ← v + Δ²          (β1 = 0 gives plain Adagrad)

Second moments start at τ² (the paper's v_{-1} ≥ τ²). Bias correction (m / (1−β1^t), v / (1−β2^t)),
which the paper does not use, is an option, off by default. All state is explicit and in float32.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch

from fedtune.aggregation.flat import flats, packed_like, unflatten
from fedtune.core.types import Params


class ServerOptimizer(Protocol):
    def init(self, params: Params) -> NamedTuple: ...

    def update(self, params: Params, pseudo_grad: Params, state: NamedTuple) -> tuple[Params, NamedTuple]: ...


def _zeros(params: Params, fill: float = 0.0) -> Params:
    return {k: torch.full(v.shape, fill, dtype=torch.float32) for k, v in params.items()}


def _apply(params: Params, step: Params, lr: float) -> Params:
    """w + lr * step, computed in float32 and cast back to each param's dtype (on the store). The result
    tiles one buffer in the step's order (``flat.packed_like``); when both sides already do, one kernel."""
    pair = flats([params, step])
    if pair is not None:
        return unflatten((pair[0].float() + lr * pair[1]).to(pair[0].dtype), params)
    out = packed_like(params, step)
    for k in out:
        torch.add(params[k].float(), lr * step[k], out=out[k])
    return out


def _plus(params: Params, step: Params) -> Params:
    """w + step, step cast to each param's dtype first (exact for lr = 1: one client's update comes back
    as it was sent); flat like ``_apply``."""
    pair = flats([params, step])
    if pair is not None:
        return unflatten(pair[0] + pair[1].to(pair[0].dtype), params)
    out = packed_like(params, step)
    for k in out:
        torch.add(params[k], step[k].to(params[k].dtype), out=out[k])
    return out


class SgdState(NamedTuple):
    step: int = 0


class Sgd:
    def __init__(self, lr: float = 1.0):
        self.lr = lr

    def init(self, params: Params) -> SgdState:
        return SgdState()

    def update(self, params: Params, pseudo_grad: Params, state: SgdState) -> tuple[Params, SgdState]:
        if self.lr == 1.0:  # plain FedAvg: no multiply, so one client's update comes back exactly
            return _plus(params, pseudo_grad), SgdState(state.step + 1)
        return _apply(params, {k: v.float() for k, v in pseudo_grad.items()}, self.lr), SgdState(state.step + 1)


class MomentumState(NamedTuple):
    velocity: dict[str, torch.Tensor]
    step: int = 0


class Momentum:
    def __init__(self, lr: float = 1.0, beta: float = 0.9):
        self.lr, self.beta = lr, beta

    def init(self, params: Params) -> MomentumState:
        return MomentumState(_zeros(params))

    def update(self, params: Params, pseudo_grad: Params, state: MomentumState) -> tuple[Params, MomentumState]:
        v = {k: self.beta * state.velocity[k] + pseudo_grad[k].float() for k in params}
        return _apply(params, v, self.lr), MomentumState(v, state.step + 1)


class AdaptiveState(NamedTuple):
    m: dict[str, torch.Tensor]
    v: dict[str, torch.Tensor]
    step: int = 0


class Adaptive:
    """FedAdam, FedYogi and FedAdagrad: one update rule family, three second-moment rules."""

    def __init__(
        self,
        rule: str,
        lr: float = 1e-2,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        bias_correction: bool = False,
    ):
        if rule not in ("adam", "yogi", "adagrad"):
            raise ValueError(f"unknown adaptive rule {rule!r}; allowed: adam, yogi, adagrad")
        self.rule, self.lr, self.beta1, self.beta2, self.tau = rule, lr, beta1, beta2, tau
        self.bias_correction = bias_correction

    def init(self, params: Params) -> AdaptiveState:
        return AdaptiveState(_zeros(params), _zeros(params, self.tau**2))

    def update(self, params: Params, pseudo_grad: Params, state: AdaptiveState) -> tuple[Params, AdaptiveState]:
        t = state.step + 1
        m, v, step = {}, {}, {}
        for k in params:
            g = pseudo_grad[k].float()
            g2 = g * g
            m[k] = self.beta1 * state.m[k] + (1 - self.beta1) * g
            if self.rule == "adam":
                v[k] = self.beta2 * state.v[k] + (1 - self.beta2) * g2
            elif self.rule == "yogi":  # additive, sign-controlled second moment
                v[k] = state.v[k] - (1 - self.beta2) * g2 * torch.sign(state.v[k] - g2)
            else:  # adagrad: the sum of squares
                v[k] = state.v[k] + g2
            m_hat, v_hat = m[k], v[k]
            if self.bias_correction:  # adagrad's v is a sum, not an average: only m is corrected there
                m_hat = m_hat / (1 - self.beta1**t)
                if self.rule != "adagrad":
                    v_hat = v_hat / (1 - self.beta2**t)
            step[k] = m_hat / (v_hat.sqrt() + self.tau)
        return _apply(params, step, self.lr), AdaptiveState(m, v, t)
