"""Split-FedLLM's settings (``paradigm: {name: split, ...}``): where the model is cut, and how the server's
part is trained. docs/algorithms/split.md has the protocol and its costs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from fedtune.config.paradigm import ParadigmConfig
from fedtune.core.registry import SPLIT_METHODS, VALUE_CODECS

if TYPE_CHECKING:
    from fedtune.config.experiment import ExperimentConfig


class SplitConfig(ParadigmConfig):
    """Split-FedLLM (paradigm split): where the model is cut, and how the server's part is trained."""

    shape: Literal["u", "vanilla"] = Field(
        "u",
        description="u: the client runs the first client_front blocks (with the embeddings) and the last "
        "client_back blocks with the final norm and LM head, so labels never leave it; vanilla: the client runs "
        "the first client_front blocks and the server the rest, head and loss included (the server sees the labels)",
    )
    client_front: int = Field(1, ge=1, description="decoder blocks on the client before the first cut")
    client_back: int | None = Field(
        None, ge=1, description="shape u: decoder blocks on the client after the second cut (default 1; 0 with vanilla)"
    )
    server_part: Literal["shared", "per_client"] = Field(
        "shared",
        description="shared: one server part, trained on each sampled client's activations in turn, client after "
        "client (SplitFed v2); per_client: one copy per client trained in parallel, averaged at the round's end "
        "(SplitFed v1; the server holds a copy of the part's adapter and optimizer state per client)",
    )
    max_micro_batches: int = Field(
        1000,
        ge=1,
        description="the most micro-batches (one exchange each) a client's round may take; a client whose data "
        "would need more trains on the first this many. Set by the config, so no client's report can lengthen a "
        "round",
    )
    activation_codecs: list[dict[str, Any]] = Field(
        default_factory=list,
        description="codec chain for hidden states and their gradients on the wire, e.g. [{name: bf16}] "
        "(value codecs only, e.g. bf16, fp16, int8); the error against uncompressed is reported",
    )

    @field_validator("activation_codecs")
    @classmethod
    def _value_codecs(cls, chain: list[dict[str, Any]]) -> list[dict[str, Any]]:
        bad = [s.get("name") for s in chain if s.get("name") not in VALUE_CODECS]
        if bad:
            raise ValueError(
                f"activation codecs may be the value codecs {', '.join(VALUE_CODECS)} (every hidden state and "
                f"gradient is needed), not {bad}"
            )
        return chain

    @model_validator(mode="after")
    def _back_fits_shape(self) -> SplitConfig:
        if self.shape == "vanilla" and self.client_back:
            raise ValueError("paradigm.client_back applies to shape u (vanilla keeps the head on the server)")
        return self

    def back(self) -> int:
        """Blocks after the second cut on the client (0 with vanilla)."""
        if self.shape == "vanilla":
            return 0
        return 1 if self.client_back is None else self.client_back


def check(cfg: ExperimentConfig) -> None:
    """Split learning's own rule: every trained tensor must sit inside a decoder block, on one side of a cut."""
    if cfg.adapter.method not in SPLIT_METHODS:
        raise ValueError(
            f"adapter.method={cfg.adapter.method} has tensors outside the decoder blocks, which split learning "
            f"cannot place on a side; use one of {', '.join(SPLIT_METHODS)}"
        )
