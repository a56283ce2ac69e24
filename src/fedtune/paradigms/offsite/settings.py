"""Offsite-tuning's settings (``paradigm: {name: offsite, ...}``): the sandwich and how its middle is compressed.

docs/algorithms/offsite.md has the formulas.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from fedtune.config.base import Strict
from fedtune.config.paradigm import ParadigmConfig
from fedtune.core.registry import LAYERED_METHODS

if TYPE_CHECKING:
    from fedtune.config.experiment import ExperimentConfig


class Teaching(Strict):
    """How the emulator's middle is trained toward the full model on the public set (distillation and
    re-alignment share it)."""

    lr: float = Field(1e-4, gt=0, description="peak learning rate (AdamW)")
    loss: Literal["logits", "hidden"] = Field(
        "logits",
        description="logits: alpha·KL(full || emulator) on next-token distributions (FS-LLM); hidden: alpha·the "
        "relative squared error of the middle's output hidden states (Offsite-Tuning); 1 - alpha on the LM loss",
    )
    batch_size: int = Field(4, ge=1, description="public examples per step")
    schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="learning-rate decay over the steps, after warmup"
    )
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="share of the steps warming up linearly")


class DistillConfig(Teaching):
    """Distilling the emulator's middle toward the full model on the public set, before round 1 (cached)."""

    steps: int = Field(100, ge=1, description="optimizer steps distilling the kept middle blocks")
    alpha: float = Field(0.9, ge=0, le=1, description="weight of the distillation term; 1 - alpha on the LM loss")


class RealignConfig(Teaching):
    """FedBiOT's server step: after each round, the emulator's middle re-aligned to the full model given the
    round's adapter (both carry it), on the public set; the changed middle goes to clients as they are asked."""

    steps: int = Field(0, ge=0, description="optimizer steps of re-alignment after each round (0: off)")
    alpha: float = Field(1.0, ge=0, le=1, description="weight of the distillation term; 1 - alpha on the LM loss")


class PruneConfig(Strict):
    """Structured pruning of the kept middle blocks (LLM-Pruner's Taylor importance), after layer drop and before
    distillation: Llama-family models."""

    mlp_keep: float = Field(
        1.0, gt=0, le=1, description="share of each middle block's MLP channels kept (1: none pruned)"
    )
    heads_keep: float = Field(
        1.0, gt=0, le=1, description="share of each middle block's key/value heads kept, with their query heads"
    )
    batches: int = Field(8, ge=1, description="public batches (of paradigm.distil.batch_size) scoring importance")

    def on(self) -> bool:
        return self.mlp_keep < 1 or self.heads_keep < 1


class OffsiteConfig(ParadigmConfig):
    """Offsite-tuning (paradigm offsite): clients tune the outer blocks around an emulator of the middle."""

    bottom: int = Field(2, ge=1, description="adapter blocks at the bottom: the first blocks, tuned by clients")
    top: int = Field(2, ge=1, description="adapter blocks at the top: the last blocks, tuned by clients")
    drop_ratio: float = Field(
        0.5, ge=0, lt=1, description="share of the middle blocks the emulator drops (uniform layer drop)"
    )
    emulator: Literal["layer_drop", "distil"] = Field(
        "layer_drop",
        description="layer_drop: the kept middle blocks as they are; distil: then trained toward the full model "
        "on the public set (paradigm.distil), cached by content",
    )
    distil: DistillConfig = Field(default_factory=DistillConfig, description="emulator=distil: how")
    realign: RealignConfig = Field(
        default_factory=RealignConfig, description="FedBiOT's per-round re-alignment of the emulator (steps > 0)"
    )
    prune: PruneConfig = Field(default_factory=PruneConfig, description="structured pruning of the kept middle")

    def trains_middle(self) -> bool:
        return self.emulator == "distil" or self.realign.steps > 0

    def uses_public(self) -> bool:
        return self.trains_middle() or self.prune.on()

    def adapter_layers(self) -> list[int]:
        """The blocks clients tune, as ``adapter.layers`` names them: the first ``bottom``, the last ``top``."""
        return [*range(self.bottom), *range(-self.top, 0)]


def resolve(cfg: ExperimentConfig) -> ExperimentConfig:
    """``adapter.layers`` defaults to the sandwich's adapter blocks: the adapter lives there only."""
    s: OffsiteConfig = cfg.paradigm  # type: ignore[assignment]
    if cfg.adapter.layers is not None:
        return cfg
    return cfg.model_copy(update={"adapter": cfg.adapter.model_copy(update={"layers": s.adapter_layers()})})


def check(cfg: ExperimentConfig) -> None:
    """The adapter must live on the adapter blocks (the emulator's middle is frozen and not the full model's);
    the public set is read only where something distils on it."""
    s: OffsiteConfig = cfg.paradigm  # type: ignore[assignment]
    public = [k for k in cfg.paradigm_keys_set() if k.startswith("data.")]
    if public and not s.uses_public():
        raise ValueError(
            f"{public[0]} is read only to distil, re-align or prune the emulator: set paradigm.emulator=distil, "
            f"paradigm.realign.steps or paradigm.prune, or remove {public[0]}"
        )
    a = cfg.adapter
    if a.method not in LAYERED_METHODS:
        raise ValueError(
            f"paradigm offsite tunes its adapter blocks; adapter.method={a.method!r} cannot be confined to blocks: "
            f"use one of {', '.join(LAYERED_METHODS)} (blocks: full tuning of them)"
        )
    if a.layers is not None and sorted(a.layers) != sorted(s.adapter_layers()):
        raise ValueError(
            f"adapter.layers={a.layers} differs from the sandwich's adapter blocks {s.adapter_layers()} "
            "(paradigm.bottom and paradigm.top); leave adapter.layers out"
        )
