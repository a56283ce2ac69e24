"""Federated DPO's settings (``paradigm: {name: dpo, ...}``): the preference loss and its reference.

docs/algorithms/dpo.md has the formulas.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from fedtune.config.paradigm import ParadigmConfig

if TYPE_CHECKING:
    from fedtune.config.experiment import ExperimentConfig


class DpoConfig(ParadigmConfig):
    """Federated DPO (paradigm dpo): each client's local loss is a preference loss over its pairs."""

    beta: float = Field(
        0.1, gt=0, description="β: how far the policy may move from the reference (DPO's KL weight; IPO's τ)"
    )
    loss: Literal["sigmoid", "ipo"] = Field(
        "sigmoid",
        description="sigmoid: DPO's −log σ(β·h), h the chosen reply's log-ratio to the reference minus the rejected "
        "one's; ipo: (h − 1/(2β))² on per-token mean log-ratios",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="sigmoid: ε, the share of pairs taken to be mislabelled (conservative DPO): "
        "−(1−ε)·log σ(β·h) − ε·log σ(−β·h)",
    )
    reference: Literal["round", "initial"] = Field(
        "round",
        description="the reference model: round, the global model the round starts from; initial, the adapter "
        "before round 1 (for LoRA the base model: OpenFedLLM's and FedLLM-Bench's choice)",
    )


def check(cfg: ExperimentConfig) -> None:
    """Rules of the preference loss, each naming the key to change."""
    s: DpoConfig = cfg.paradigm  # type: ignore[assignment]
    if cfg.data.dataset == "builtin:tasks":
        raise ValueError(
            "paradigm dpo trains on preference pairs; builtin:tasks has none: set data.dataset to "
            "builtin:preferences, or to a file of {prompt, chosen, rejected} records"
        )
    if cfg.data.train_on_prompt:
        raise ValueError("paradigm dpo compares two replies to one prompt: remove data.train_on_prompt")
    if s.label_smoothing and s.loss != "sigmoid":
        raise ValueError(f"paradigm.label_smoothing applies to loss sigmoid, not {s.loss}; remove it")
