"""The ``aggregation`` section: clip -> combine -> server optimizer (docs/algorithms/)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from fedtune.config.base import Strict
from fedtune.config.compression import CodecConfig
from fedtune.core.registry import AGGREGATORS, COMBINERS


class AggregationConfig(Strict):
    """Server-side aggregation: clip -> combine -> server optimizer (docs/algorithms/)."""

    name: AGGREGATORS.literal() = Field(
        "fedavg", description=AGGREGATORS.describe("server optimizer applied to the combined update: ")
    )
    weighting: Literal["examples", "tokens", "uniform"] = Field(
        "examples", description="client weight: training examples, target tokens, or equal"
    )
    server_lr: float | None = Field(
        None, gt=0, description="server learning rate η; default 1 (fedavg/m), 0.01 (FedOpt)"
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="fedavgm: server momentum β")
    beta1: float = Field(0.9, ge=0, lt=1, description="FedOpt: first-moment decay β1")
    beta2: float = Field(0.99, ge=0, lt=1, description="fedadam/fedyogi: second-moment decay β2")
    tau: float = Field(1e-3, gt=0, description="FedOpt: adaptivity τ (second moments start at τ²)")
    bias_correction: bool = Field(False, description="FedOpt: Adam-style bias correction (not in the paper)")
    combine: COMBINERS.literal() = Field("mean", description=COMBINERS.describe("how client updates become one: "))
    trim_fraction: float = Field(0.1, ge=0, lt=0.5, description="trimmed_mean: share cut at each end per coordinate")
    byzantine: int = Field(0, ge=0, description="krum: number f of clients assumed malicious")
    krum_select: int = Field(1, ge=1, description="krum: how many best-scored updates to average (1 = Krum)")
    clip_norm: float | None = Field(None, gt=0, description="scale every update down to this L2 norm first")
    scaffold: bool = Field(False, description="SCAFFOLD control variates (server c, per-client c_i)")
    lora: Literal["auto", "exact", "naive", "ffa"] = Field(
        "auto",
        description="LoRA aggregation: exact (mean of B·A, rank-r SVD; FlexLoRA with client_ranks), naive (A, B "
        "averaged apart, error reported; HetLoRA zero-padding with client_ranks), ffa (A frozen, exact); auto: exact "
        "when name=fedavg, combine=mean, no scaffold, else naive",
    )
    max_update_norm: float | Literal["auto"] | None = Field(
        "auto",
        description="reject (drop and log) any update whose L2 norm exceeds this (under secure aggregation, "
        "clients clip to it and the sum is checked against it; in split learning it bounds the server part's "
        "change in a client's session too). auto: the most the configured local training can move the adapter "
        "in a round (AdamW: lr x a step ratio x sqrt(values) per step; SGD: lr x training.max_grad_norm), "
        "stated in the log; null: no bound (not for deployments)",
    )

    edges: int = Field(
        0,
        ge=0,
        le=10_000,
        description="hierarchical aggregation: clients -> this many edge aggregators -> the server (client c at "
        "edge c·edges // partition.num_clients: contiguous blocks); each edge aggregates its clients' updates, "
        "the server the edges' (weighted by their clients' total weight); 0: flat",
    )
    edge: dict[str, Any] = Field(
        default_factory=dict,
        description="the edges' aggregator: overrides of this section's keys, e.g. {combine: median} (default: "
        "the same aggregator as the server's)",
    )
    edge_uplink: list[CodecConfig] = Field(
        default_factory=list, description="codec chain of each edge's aggregate on its way to the server"
    )

    @field_validator("edge")
    @classmethod
    def _edge_keys(cls, edge: dict[str, Any]) -> dict[str, Any]:
        own = [k for k in edge if k in ("edges", "edge", "edge_uplink", "max_update_norm")]
        if own:
            raise ValueError(f"aggregation.edge sets {own}: an edge's aggregator takes the aggregation keys but these")
        return edge

    def edge_config(self) -> AggregationConfig:
        """The edges' aggregation settings: this section with ``edge``'s overrides, flat."""
        base = self.model_dump(exclude={"edges", "edge", "edge_uplink"})
        return AggregationConfig(**{**base, **self.edge})

    @model_validator(mode="after")
    def _edge_valid(self) -> AggregationConfig:
        if self.edge and not self.edges:
            raise ValueError("aggregation.edge applies with aggregation.edges > 0")
        if self.edge_uplink and not self.edges:
            raise ValueError("aggregation.edge_uplink applies with aggregation.edges > 0")
        if self.edges and self.scaffold:
            raise ValueError("SCAFFOLD's control variates are per client: not with aggregation.edges")
        if self.edge:
            self.edge_config()  # a bad override is an error here, naming its key
        return self

    @field_validator("max_update_norm")
    @classmethod
    def _positive(cls, value: float | str | None) -> float | str | None:
        if isinstance(value, float | int) and not value > 0:
            raise ValueError(f"must be > 0, auto or null, not {value}")
        return value

    @model_validator(mode="after")
    def _lora_exact_fits(self) -> AggregationConfig:
        if self.lora == "exact" and not self.exact_lora_compatible():
            raise ValueError(
                "aggregation.lora=exact aggregates LoRA products with FedAvg (name=fedavg, server_lr 1, "
                "combine=mean, no scaffold); for other settings use lora=naive (inexact, error reported) "
                "or lora=ffa (exact, A frozen)"
            )
        return self

    def exact_lora_compatible(self) -> bool:
        return self.name == "fedavg" and self.combine == "mean" and not self.scaffold and self.server_lr in (None, 1.0)

    def lora_mode(self) -> str:
        """The LoRA aggregation actually used ('auto' resolved)."""
        if self.lora != "auto":
            return self.lora
        return "exact" if self.exact_lora_compatible() else "naive"
