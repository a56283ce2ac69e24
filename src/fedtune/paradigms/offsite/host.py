"""The server's emulator: what clients are sent, its digest, and FedBiOT's re-alignment of its middle.

Re-alignment (Wu et al. 2024, FedBiOT) runs after each round's aggregation: with the round's global
adapter on both models, the emulator's kept middle blocks take ``steps`` AdamW steps on the public set
toward the full model (``distill``'s loss: α·KL(full+adapter ‖ emulator+adapter) + (1-α)·LM, or the
middle's hidden states matched),
the adapter blocks, embeddings and head fixed. The middle it leaves is part of the server state.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from fedtune.adapters.adapter_model import AdapterModel
from fedtune.core.types import Params
from fedtune.paradigms.offsite.distill import DistillSettings, distil, middle_names
from fedtune.paradigms.offsite.emulator import Sandwich, digest


@dataclass
class Realignment:
    settings: DistillSettings  # steps (> 0), lr, alpha, loss, schedule, seed (each round's is seed + round)
    batches: list[tuple[torch.Tensor, torch.Tensor]]  # the public set, (input_ids, attention_mask) each (B, T)
    full: AdapterModel  # the server's full model with its adapter (the teacher)
    plug_in: Any  # Callable[[Params], Params]: an emulator adapter renamed onto the full model


@dataclass
class Host:
    """The server's emulator: ``emu`` (an AdapterModel over it) and its own parameters by name (``own``)."""

    emu: AdapterModel
    own: dict[str, torch.nn.Parameter]  # the emulator model's parameters by its own names (``emulator.weights``)
    sandwich: Sandwich
    initial: Params
    realignment: Realignment | None = None  # None: no re-alignment (FedBiOT off)
    progress: bool = False
    _digest: str | None = field(default=None, repr=False)
    _loaded: Any = field(default=None, repr=False)

    @property
    def realigns(self) -> bool:
        return self.realignment is not None

    def weights(self) -> Params:
        """The frozen emulator: its tensors but those the adapter trains (``adapter.method`` blocks or bitfit
        tune the emulator's own tensors; they travel as the adapter, so the emulator's digest stays put)."""
        return {n: p.detach() for n, p in self.own.items() if n not in self.emu.params}

    def digest(self) -> str:
        if self._digest is None:
            self._digest = digest(self.weights())
        return self._digest

    def middle_names(self) -> list[str]:
        return middle_names(self.emu.model, self.sandwich, own=self.own)

    def middle(self) -> Params:
        """A copy of the middle as it is now; loading it back is then a no-op (``load_middle``)."""
        self._loaded = {n: self.own[n].detach().clone() for n in self.middle_names()}
        return self._loaded

    def load_middle(self, middle: Params) -> None:
        if middle is self._loaded:  # the state's own tensors, already in place
            return
        with torch.no_grad():
            for n, t in middle.items():
                self.own[n].copy_(t)
        self._loaded, self._digest = middle, None

    def realign(self, params: Params, r: int) -> dict[str, Any] | None:
        if not self.realigns:
            return None
        a = self.realignment
        assert a is not None
        a.full.set_state(a.plug_in(params))
        self.emu.set_state(params)
        n = len(a.batches)
        start = (r - 1) * a.settings.steps % n  # each round goes on through the public set
        batches = a.batches[start:] + a.batches[:start]
        settings = replace(a.settings, seed=a.settings.seed + r)
        losses = distil(self.emu.model, a.full.model, self.sandwich, batches, settings, self.progress)
        self._digest, self._loaded = None, None  # the middle changed: another emulator
        return {"realign_loss": sum(losses) / len(losses)}
