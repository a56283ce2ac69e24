"""The ``split`` config section: Split-FedLLM, the model cut between client and server.

docs/algorithms/split.md has the protocol and its costs; ``paradigm: split`` turns it on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from fedtune.config_base import Strict as _Strict
from fedtune.registry import SPLIT_METHODS, VALUE_CODECS

if TYPE_CHECKING:
    from fedtune.config import ExperimentConfig


class SplitConfig(_Strict):
    """Split-FedLLM (paradigm: split): where the model is cut, and how the server's part is trained."""

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
    activation_codecs: list[dict[str, Any]] = Field(
        default_factory=list,
        description="codec chain for hidden states and their gradients on the wire, e.g. [{name: bf16}] "
        "(value codecs only, e.g. bf16, fp16, int8); the error against uncompressed is reported",
    )

    @model_validator(mode="after")
    def _back_fits_shape(self) -> SplitConfig:
        if self.shape == "vanilla" and self.client_back:
            raise ValueError("split.client_back applies to split.shape=u (vanilla keeps the head on the server)")
        return self

    def back(self) -> int:
        """Blocks after the second cut on the client (0 with vanilla)."""
        if self.shape == "vanilla":
            return 0
        return 1 if self.client_back is None else self.client_back


def check_split_fits(cfg: ExperimentConfig) -> None:
    """ValueError naming what split learning does not do (yet) in the rest of ``cfg``, said before a model
    is loaded."""
    c = cfg.compression
    unused = ["training.proximal_mu (FedProx)"] if cfg.training.proximal_mu else []
    unused += ["aggregation.scaffold"] if cfg.aggregation.scaffold else []
    unused += ["adapter.client_ranks"] if cfg.adapter.client_ranks is not None else []
    unused += ["compression.error_feedback"] if c.error_feedback else []
    unused += ["compression.downlink_updates"] if c.downlink_updates else []
    unused += ["evaluation.per_client (the clients hold only their part)"] if cfg.evaluation.per_client else []
    if unused:
        raise ValueError(f"paradigm split does not support {', '.join(unused)}; remove them")
    bad = [s.get("name") for s in cfg.split.activation_codecs if s.get("name") not in VALUE_CODECS]
    if bad:
        raise ValueError(
            f"split.activation_codecs may use the value codecs {', '.join(VALUE_CODECS)} (every hidden state and "
            f"gradient is needed), not {bad}"
        )
    if cfg.adapter.method not in SPLIT_METHODS:
        raise ValueError(
            f"adapter.method={cfg.adapter.method} has tensors outside the decoder blocks, which split learning "
            f"cannot place on a side; use one of {', '.join(SPLIT_METHODS)}"
        )
