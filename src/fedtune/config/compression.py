"""The ``compression`` config section: codec chains for each direction (docs/algorithms/compression.md)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_serializer, model_validator

from fedtune.config.base import Strict
from fedtune.core.registry import CODECS, VALUE_CODECS

DOWNLINK_CODECS = VALUE_CODECS  # the downlink carries the adapter itself, not an update
_CODEC_FIELDS = {e.name: set(e.options.values()) for e in CODECS}  # which optional keys each codec takes


class CodecConfig(Strict):
    """One compression stage; a bare name (``int8``) stands for ``{name: int8}`` with defaults."""

    name: CODECS.literal() = Field(description=CODECS.describe())
    per: Literal["tensor", "channel"] = Field(
        "channel", description="int8/int4: one scale per tensor, or per channel (rows or columns, whichever are fewer)"
    )
    rounding: Literal["nearest", "stochastic"] = Field(
        "nearest", description="int8/int4: round to nearest, or stochastic (unbiased, FedPAQ)"
    )
    fraction: float = Field(0.1, gt=0, le=1, description="topk/randk: share of entries sent per tensor")
    rank: int = Field(4, ge=1, description="lowrank: rank of the truncated SVD of each matrix")
    keep_fraction: float = Field(0.5, gt=0, le=1, description="block_dropout: share of layer blocks sent")

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _fields_fit(self) -> CodecConfig:
        extra = self.model_fields_set - {"name"} - _CODEC_FIELDS.get(self.name, set())
        if extra:
            allowed = sorted(_CODEC_FIELDS.get(self.name, set())) or "none"
            raise ValueError(f"codec {self.name} takes no {sorted(extra)} (its options: {allowed})")
        return self

    @model_serializer(mode="plain")
    def _dump(self) -> dict[str, Any]:  # a saved config lists only the options this codec takes
        return self.spec()

    def spec(self) -> dict[str, Any]:
        """The codec's name and the options it takes, for ``fedtune.codecs.build_codec``."""
        return {"name": self.name, **{k: getattr(self, k) for k in sorted(_CODEC_FIELDS.get(self.name, ()))}}


class CompressionConfig(Strict):
    """What crosses the network: codec chains for each direction (docs/algorithms/compression.md)."""

    uplink: list[CodecConfig] = Field(
        default_factory=list,
        description="client -> server chain applied to each update in order, e.g. [{name: topk, fraction: 0.05}, "
        "int8]; empty: fp32 as trained",
    )
    downlink: list[CodecConfig] = Field(
        default_factory=list, description="server -> client chain for the global adapter: fp16, bf16, int8, int4"
    )
    error_feedback: bool = Field(
        False, description="uplink: each client adds what compression dropped last time to its next update (EF)"
    )
    downlink_updates: bool = Field(
        False,
        description="send each client the change from the adapter it holds (server keeps a replica per client), "
        "so the downlink chain may sparsify; what it drops is sent later",
    )

    @model_validator(mode="after")
    def _directions_fit(self) -> CompressionConfig:
        bad = [c.name for c in self.downlink if c.name not in DOWNLINK_CODECS]
        if bad and not self.downlink_updates:
            raise ValueError(
                f"compression.downlink cannot use {bad}: the downlink carries the global adapter itself, not an "
                f"update, and sparsifying or truncating it would destroy weights. Use {', '.join(DOWNLINK_CODECS)}, "
                "or set compression.downlink_updates: true to send each client the change to what it holds"
            )
        if self.error_feedback and not self.uplink:
            raise ValueError("compression.error_feedback needs a compression.uplink chain to correct")
        return self
