"""The training section: each client's local optimisation (steps, schedule, optimizer, memory options)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from fedtune.config.base import Strict


class TrainingConfig(Strict):
    """Local training on each client."""

    local_steps: int | None = Field(5, ge=1, description="optimizer steps per round (or use local_epochs)")
    local_epochs: float | None = Field(None, gt=0, description="passes over local data per round")
    batch_size: int = Field(8, ge=1, description="examples per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(1e-3, gt=0, description="peak learning rate of the local optimizer")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field("constant", description="decay after warmup")
    lr_min: float = Field(0.0, ge=0, description="where linear and cosine decay end")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="share of the schedule spent warming up linearly")
    schedule_scope: Literal["federation", "round", "by_round"] = Field(
        "federation",
        description="federation: schedule follows the run's global step; round: restarts each round; by_round: one "
        "rate per round, decayed over rounds at progress round / rounds (FlowerTune's per-round cosine)",
    )
    gradient: Literal["backprop", "zeroth_order", "forward"] = Field(
        "backprop",
        description="how a step's gradient is had: back-propagation; zeroth_order: MeZO's estimate from two "
        "forward passes along a seeded random direction, stepped by SGD with no gradient, optimizer state or "
        "activations held; forward: FwdLLM's forward gradient, the mean of several such estimates a step, their "
        "count paced by variance and their directions aligned with the round's earlier steps "
        "(docs/algorithms/zeroth_order.md)",
    )
    zo_eps: float = Field(1e-3, gt=0, description="zeroth_order, forward: the perturbation's scale ε")
    zo_clip: float | None = Field(
        100.0,
        gt=0,
        description="zeroth_order, forward: a perturbation whose |projected gradient| is above this is left out "
        "(null: off; the auto update bound needs it)",
    )
    fwd_perturbations: int = Field(
        8, ge=2, le=1024, description="forward: the most perturbations a step averages (two forward passes each)"
    )
    fwd_variance: float | None = Field(
        None,
        gt=0,
        description="forward: stop adding perturbations (two at a time) once the estimate's split-half variance, "
        "mean over values of Var(mean of even, mean of odd perturbations), is at most this (FwdLLM's pacing; "
        "null: always fwd_perturbations)",
    )
    fwd_candidates: int = Field(
        4,
        ge=1,
        le=64,
        description="forward: seeded candidate directions per tensor, the one best aligned (cosine) with the "
        "round's earlier estimates taken (1: plain Gaussian directions)",
    )
    optimizer: Literal["adamw", "sgd"] = Field(
        "adamw", description="local optimizer (fresh state every round; sgd with gradient zeroth_order)"
    )
    weight_decay: float = Field(0.0, ge=0, description="weight decay of the local optimizer")
    proximal_mu: float = Field(
        0.0, ge=0, description="FedProx: add mu/2 * ||w - w_global||^2 to the local loss (0: off)"
    )
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="clip the adapter gradient norm (null: off; off by default with gradient zeroth_order)"
    )
    gradient_checkpointing: bool = Field(
        False,
        description="keep only each block's input for backward and recompute the rest: far less activation "
        "memory for about 1/3 more compute on a frozen base (the same adapter; not with split or DP-SGD)",
    )
    fused_loss: bool = Field(
        True,
        description="run the LM head and its cross-entropy together in chunks of target positions, taking the "
        "head's gradient as it goes: no vocabulary-wide logits kept for backward (the same loss up to float "
        "summation order; models whose logits are their head's output, else the plain path)",
    )

    @model_validator(mode="before")
    @classmethod
    def _epochs_replace_steps(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("local_epochs") is not None and "local_steps" not in data:
            data = {**data, "local_steps": None}  # giving epochs sets the default steps aside
        return data

    @model_validator(mode="before")
    @classmethod
    def _zeroth_order_steps_by_sgd(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("gradient") in ("zeroth_order", "forward"):
            # ZO-SGD: its update is -lr g z, nothing else held; no gradient is formed to clip
            data = {"optimizer": "sgd", "max_grad_norm": None, **data}
        return data

    @model_validator(mode="after")
    def _zeroth_order_fits(self) -> TrainingConfig:
        if not self.backprop_free:
            return self
        problems = []
        if self.optimizer != "sgd":
            problems.append(f"training.optimizer={self.optimizer} (its steps are ZO-SGD's: use sgd, the default here)")
        if self.grad_accum != 1:
            problems.append("training.grad_accum (each step estimates its gradient on one batch)")
        if self.max_grad_norm is not None:
            problems.append("training.max_grad_norm (no gradient is formed: training.zo_clip bounds a step)")
        if self.weight_decay:
            problems.append("training.weight_decay (a step is -lr g z alone, so that its seed and g replay it)")
        if self.proximal_mu:
            problems.append("training.proximal_mu (FedProx's term needs the gradient)")
        if self.gradient_checkpointing:
            problems.append("training.gradient_checkpointing (nothing is kept for a backward pass)")
        if problems:
            raise ValueError(f"training.gradient={self.gradient} cannot be combined with " + "; ".join(problems))
        return self

    @property
    def backprop_free(self) -> bool:
        """Steps from forward passes alone (zeroth_order, forward): no gradient, optimizer state or activations."""
        return self.gradient != "backprop"

    @model_validator(mode="after")
    def _floor_below_peak(self) -> TrainingConfig:
        if self.lr_min > self.lr:
            raise ValueError(f"training.lr_min={self.lr_min} is above training.lr={self.lr}")
        return self

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> TrainingConfig:
        if (self.local_steps is None) == (self.local_epochs is None):
            raise ValueError("set exactly one of training.local_steps and training.local_epochs")
        return self
