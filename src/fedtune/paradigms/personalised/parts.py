"""Which adapter tensors stay with a client (FedPer, FedRep), and the step shapes of FedRep and pFedMe.

``Freeze`` trains some tensors while others stay as they are (FedRep's two phases); ``LocalCopy`` is pFedMe's
local model w, pulled on by the personal adapter θ being trained (Dinh et al. 2020, Algorithm 1).
Both are ``client.corrections`` plug-ins: they act beside the trainable tensors, in their order.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from fedtune.adapters.lora_math import lora_pairs
from fedtune.core.errors import ConfigError
from fedtune.models.blocks import layout_of


def personal_names(names: Sequence[str], model: nn.Module, blocks: int, pattern: str | None) -> frozenset[str]:
    """The adapter tensors (of ``names``) that stay on each client: those ``pattern`` matches, else those of
    the last ``blocks`` decoder blocks that carry any. ConfigError when either side would be empty, or a LoRA
    module's A and B would fall on different sides."""
    if pattern is not None:
        rx = re.compile(pattern)
        personal = frozenset(n for n in names if rx.search(n))
        how = f"paradigm.personal_keys={pattern!r}"
    else:
        rx = layout_of(model).block_name
        index = {n: int(m.group(1)) for n in names if (m := rx.search(n))}
        last = sorted(set(index.values()))[-blocks:]
        personal = frozenset(n for n, b in index.items() if b in last)
        how = f"paradigm.personal_blocks={blocks} (blocks {last})"
    shared = [n for n in names if n not in personal]
    if not personal or not shared:
        side = "no" if not personal else "every"
        raise ConfigError(
            f"{how} makes {side} adapter tensor personal; FedPer/FedRep need both a shared and a personal part "
            f"(the adapter has {len(names)} tensors, e.g. {sorted(names)[:2]})"
        )
    try:
        if any("lora_A" in n for n in names):  # LoRA's A trains (not FFA-LoRA): aggregation pairs it with its B
            lora_pairs(sorted(personal))
            lora_pairs(shared)
    except ValueError as exc:
        raise ConfigError(f"{how} splits a LoRA module's A from its B ({exc}); keep each module on one side") from None
    return personal


class Freeze:
    """Steps [0, switch) train only the tensors ``first`` marks; the steps after, only the others (FedRep:
    the personal head, then the shared body). A frozen tensor's gradient is dropped before clipping, so the
    optimizer neither moves it nor decays it, and clipping sees the trained part alone."""

    def __init__(self, first: Sequence[bool], switch: int):
        self.first, self.switch, self.step = list(first), switch, 0

    def extra_loss(self, params: Sequence[nn.Parameter]) -> None:
        return None

    def adjust_grads(self, params: Sequence[nn.Parameter]) -> None:
        trains_first = self.step < self.switch
        for p, first in zip(params, self.first, strict=True):
            if first != trains_first:
                p.grad = None

    def after_step(self, params: Sequence[nn.Parameter], lr: float) -> None:
        self.step += 1


class LocalCopy:
    """pFedMe: the trained tensors are the personal adapter θ, with the loss + λ/2·‖θ − w‖²; after every
    ``every`` steps the local copy moves toward it, w ← w − η·λ·(w − θ). ``local`` is w, where θ lives."""

    def __init__(self, start: Sequence[torch.Tensor], lam: float, eta: float, every: int):
        self.local = [t.detach().clone() for t in start]
        self.lam, self.eta, self.every, self.step = lam, eta, every, 0

    def extra_loss(self, params: Sequence[nn.Parameter]) -> torch.Tensor:
        sq = sum(((p - w) ** 2).sum() for p, w in zip(params, self.local, strict=True))
        return 0.5 * self.lam * sq

    def adjust_grads(self, params: Sequence[nn.Parameter]) -> None:
        pass

    @torch.no_grad()
    def after_step(self, params: Sequence[nn.Parameter], lr: float) -> None:
        self.step += 1
        if self.step % self.every == 0:
            for p, w in zip(params, self.local, strict=True):
                w.add_(p.detach().to(w.dtype) - w, alpha=self.eta * self.lam)
