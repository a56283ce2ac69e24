"""Plug-ins that change local training: FedProx's proximal term, SCAFFOLD's gradient correction.

A correction may add a loss term (``extra_loss``, back-propagated once per optimizer step),
adjust gradients after back-propagation (``adjust_grads``, before clipping and the step), and move
the parameters after the optimizer step (``after_step``, given that step's learning rate).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from fedtune.core.types import Params


class Correction(Protocol):
    def extra_loss(self, params: Sequence[torch.nn.Parameter]) -> torch.Tensor | None: ...

    def adjust_grads(self, params: Sequence[torch.nn.Parameter]) -> None: ...

    def after_step(self, params: Sequence[torch.nn.Parameter], lr: float) -> None: ...


class FedProx:
    """Li et al. 2020: loss + mu/2 * ||w - w_global||^2 over the trainable (adapter) parameters.

    Its gradient is mu * (w - w_global): zero at the first step (w = w_global), growing as the
    client drifts; a test checks both the value and the gradient after one local step.
    """

    def __init__(self, anchor: Sequence[torch.Tensor], mu: float):
        self.anchor = [a.detach().clone() for a in anchor]
        self.mu = mu

    def extra_loss(self, params: Sequence[torch.nn.Parameter]) -> torch.Tensor:
        sq = sum(((p - a) ** 2).sum() for p, a in zip(params, self.anchor, strict=True))
        return 0.5 * self.mu * sq

    def adjust_grads(self, params: Sequence[torch.nn.Parameter]) -> None:
        pass

    def after_step(self, params: Sequence[torch.nn.Parameter], lr: float) -> None:
        pass


class Scaffold:
    """Karimireddy et al. 2020: every local step also moves by -lr (c - c_i), this client's drift correction.

    With SGD this is exactly the paper's corrected gradient g + c - c_i. With an adaptive optimizer
    the correction is applied in the same units as the control variates, which are measured as
    (x - y) / sum(lr), i.e. parameter movement per unit of learning rate; adding c - c_i to the raw
    gradient before Adam's normalisation would mix those units with gradient units.
    """

    def __init__(self, server_control: Sequence[torch.Tensor], client_control: Sequence[torch.Tensor]):
        self.correction = [(c - ci).detach() for c, ci in zip(server_control, client_control, strict=True)]

    def extra_loss(self, params: Sequence[torch.nn.Parameter]) -> None:
        return None

    def adjust_grads(self, params: Sequence[torch.nn.Parameter]) -> None:
        pass

    @torch.no_grad()
    def after_step(self, params: Sequence[torch.nn.Parameter], lr: float) -> None:
        for p, corr in zip(params, self.correction, strict=True):
            p.add_(corr.to(p.dtype), alpha=-lr)


def updated_client_control(
    client_control: Params, server_control: Params, start: Params, end: Params, lr_sum: float
) -> Params:
    """SCAFFOLD option II: c_i+ = c_i - c + (x - y_i) / (sum of the local learning rates).

    With a constant learning rate the sum is K * lr, the paper's form; with a schedule it is the
    exact length of the local SGD path.
    """
    return {k: client_control[k] - server_control[k] + (start[k] - end[k]) / lr_sum for k in start}
