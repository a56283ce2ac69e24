"""KD-FedLLM's settings (``paradigm: {name: kd, ...}``): what clients send about the public set, and what comes back.

docs/algorithms/kd.md has the formulas.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from fedtune.config.paradigm import ParadigmConfig
from fedtune.core.registry import VALUE_CODECS

if TYPE_CHECKING:
    from fedtune.config.experiment import ExperimentConfig


class KDConfig(ParadigmConfig):
    """KD-FedLLM (paradigm kd): what clients send about the public set, and what comes back."""

    downlink: Literal["logits", "adapter"] = Field(
        "logits",
        description="logits: the server sends the consensus and each client distils it into its own adapter "
        "(FedMD / DS-FL; no weights cross the wire); adapter: the server distils it into the global adapter "
        "and sends that (server-side distillation, FedDF style)",
    )
    top_k: int = Field(8, ge=1, description="token probabilities each client sends per public response position")
    consensus_top_k: int | None = Field(
        None,
        ge=1,
        description="consensus tokens kept per position: sent back with the logits downlink (default top_k); "
        "distilled on the server with the adapter downlink (default all of them: clients per round x top_k)",
    )
    public_slice: int = Field(32, ge=1, description="public examples scored per round (a seeded sample each round)")
    temperature: float = Field(2.0, gt=0, description="distillation temperature T (the loss is scaled by T²)")
    weighting: Literal["uniform", "examples", "confidence"] = Field(
        "uniform",
        description="consensus weight of a client: equal, its training examples, or per position its top-1 "
        "probability (confidence)",
    )
    distill_steps: int = Field(
        5, ge=1, description="optimizer steps distilling the consensus per round (on each client, or the server)"
    )
    distill_batch_size: int = Field(8, ge=1, description="public examples per distillation step")
    distill_lr: float | None = Field(None, gt=0, description="distillation learning rate; default training.lr")
    score_batch_size: int = Field(16, ge=1, description="public examples per forward pass when scoring")
    client_models: list[str] | None = Field(
        None,
        description="logits downlink: client i runs client_models[i % len] (model names as in model.name), "
        "all sharing model.name's tokenizer; default: every client runs model.name",
    )

    @model_validator(mode="after")
    def _fits_downlink(self) -> KDConfig:
        if self.downlink == "adapter" and self.client_models is not None:
            raise ValueError(
                "paradigm.client_models needs paradigm.downlink=logits: with the adapter on the downlink every "
                "client trains the one global adapter, which fits one model"
            )
        if self.client_models is not None and not self.client_models:
            raise ValueError("paradigm.client_models must list at least one model, or be left out")
        return self


def check(cfg: ExperimentConfig) -> None:
    """KD's own rule: its messages carry probabilities (and the adapter itself), so codecs must keep every value."""
    c = cfg.compression
    bad = [s.name for s in [*c.uplink, *c.downlink] if s.name not in VALUE_CODECS]
    if bad:
        raise ValueError(
            f"paradigm kd sends probabilities (and with paradigm.downlink=adapter the adapter itself), which must "
            f"keep every value: compression.uplink/downlink may use {', '.join(VALUE_CODECS)}, not {bad}"
        )
