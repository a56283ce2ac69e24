"""The ``adapter`` section: the parameter-efficient module clients train and share (docs/algorithms/peft.md)."""

from __future__ import annotations

from pydantic import Field, model_validator

from fedtune.config.base import Strict
from fedtune.core.registry import LAYERED_METHODS, PEFT_METHODS

DEFAULT_TARGETS = {e.name: list(e.info["targets"]) for e in PEFT_METHODS if "targets" in e.info}


class AdapterConfig(Strict):
    """The parameter-efficient module clients train and share (docs/algorithms/peft.md)."""

    method: PEFT_METHODS.literal() = Field("lora", description=PEFT_METHODS.describe("PEFT method: "))
    r: int = Field(8, ge=1, description="LoRA rank")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; the update is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA / bottleneck dropout")
    dora: bool = Field(False, description="lora: weight-decomposed LoRA (DoRA, Liu et al. 2024)")
    target_modules: list[str] | None = Field(
        None,
        description="Linear layers the method wraps (an error lists the model's own); default per method: "
        + "; ".join(f"{m} {', '.join(t)}" for m, t in DEFAULT_TARGETS.items()),
    )
    layers: list[int] | None = Field(
        None,
        description="only these decoder blocks get the adapter (0 the first; negative counts from the top, -1 the "
        f"last): methods {', '.join(LAYERED_METHODS)}; default: every block",
    )
    feedforward_modules: list[str] | None = Field(
        None, description="ia3: which target_modules scale their input (MLP); default: down_proj among the targets"
    )
    num_virtual_tokens: int = Field(20, ge=1, description="prompt_tuning / prefix_tuning / p_tuning: virtual tokens")
    encoder_hidden_size: int = Field(128, ge=1, description="p_tuning: hidden size of the prompt encoder MLP")
    bottleneck_dim: int = Field(16, ge=1, description="bottleneck: width of the down/up projection")
    init_seed: int | None = Field(None, description="seed of the initial adapter; default: top-level seed")
    client_ranks: list[int] | None = Field(
        None,
        description="heterogeneous ranks: client i trains rank client_ranks[i % len] (each <= r, the global rank)",
    )

    @model_validator(mode="after")
    def _fits_method(self) -> AdapterConfig:
        if self.method != "lora":
            if self.dora:
                raise ValueError(f"adapter.dora is a LoRA option; adapter.method is {self.method!r}")
            if self.client_ranks is not None:
                raise ValueError(
                    f"adapter.client_ranks (heterogeneous LoRA ranks) needs method lora, not {self.method!r}"
                )
        if self.target_modules is not None and self.method not in DEFAULT_TARGETS:
            raise ValueError(
                f"adapter.target_modules does not apply to method {self.method!r} "
                f"(it applies to {', '.join(DEFAULT_TARGETS)}); remove it"
            )
        if self.layers is not None:
            if self.method not in LAYERED_METHODS:
                raise ValueError(f"adapter.layers applies to methods {', '.join(LAYERED_METHODS)}, not {self.method!r}")
            if not self.layers or len(set(self.layers)) != len(self.layers):
                raise ValueError(f"adapter.layers={self.layers}: give a non-empty list of distinct block indices")
        if self.feedforward_modules is not None and self.method != "ia3":
            raise ValueError("adapter.feedforward_modules applies to method ia3 only; remove it")
        return self

    def targets(self) -> list[str]:
        """target_modules, or the method's default ([] for methods that wrap no layers)."""
        return list(self.target_modules if self.target_modules is not None else DEFAULT_TARGETS.get(self.method, []))

    def blocks(self, num_blocks: int) -> list[int] | None:
        """``layers`` as ascending block indices of a model with ``num_blocks`` blocks (None: every block);
        ValueError naming the model's range when one is outside it or two name the same block."""
        if self.layers is None:
            return None
        out = sorted({b % num_blocks for b in self.layers if -num_blocks <= b < num_blocks})
        if len(out) != len(self.layers):
            raise ValueError(
                f"adapter.layers={self.layers}: this model has {num_blocks} blocks (0..{num_blocks - 1}, or "
                f"-{num_blocks}..-1 from the top), each named once"
            )
        return out

    def is_lora(self) -> bool:
        return self.method == "lora"

    @model_validator(mode="after")
    def _ranks_fit(self) -> AdapterConfig:
        if self.client_ranks is not None:
            if not self.client_ranks or min(self.client_ranks) < 1:
                raise ValueError("adapter.client_ranks must be a non-empty list of ranks >= 1")
            if max(self.client_ranks) > self.r:
                raise ValueError(
                    f"adapter.client_ranks {self.client_ranks} exceed adapter.r={self.r}, the global rank; "
                    f"set adapter.r={max(self.client_ranks)}"
                )
        return self

    def joint_misfit(self) -> str | None:
        """What keeps several clients' adapters of this kind from one forward with rows routed per client."""
        if not self.is_lora():
            return f"adapter.method {self.method} (joint training routes LoRA's rows)"
        if self.dora:
            return "adapter.dora (DoRA's weight norm is not row-separable)"
        if self.dropout > 0:
            return f"adapter.dropout={self.dropout} (a client trained with others would draw other masks)"
        if self.client_ranks is not None:
            return "adapter.client_ranks (clients of different ranks)"
        return None

    def rank_of_client(self, client_id: int) -> int:
        return self.r if self.client_ranks is None else self.client_ranks[client_id % len(self.client_ranks)]
