"""The ``federation`` section: rounds, who takes part in each, and what a client may claim."""

from __future__ import annotations

from pydantic import Field, model_validator

from fedtune.config.base import Strict


class FederationConfig(Strict):
    """Rounds and who takes part in each."""

    rounds: int = Field(5, ge=1, lt=2**31, description="communication rounds")
    clients_per_round: int | None = Field(None, ge=1, description="count sampled per round; default all")
    fraction: float | None = Field(None, gt=0, le=1, description="alternative to clients_per_round")
    min_clients: int = Field(1, ge=1, description="fewer good replies than this stops the run")
    round_timeout_s: float | None = Field(
        None,
        gt=0,
        description="deadline for replies in a round (ray, flower); late clients count as dropped; "
        "unset: none with ray, 3600 s in a deployment",
    )
    max_client_examples: int | None = Field(
        None,
        ge=1,
        description="the most training examples one client can count for in aggregation (tokens weighting: this "
        "× data.max_seq_len tokens); a larger report counts as the cap. unset: the largest partition in "
        "simulation, 1,000,000 in a deployment, where the server cannot see the clients' data",
    )

    @model_validator(mode="after")
    def _one_of(self) -> FederationConfig:
        if self.clients_per_round is not None and self.fraction is not None:
            raise ValueError("set federation.clients_per_round or federation.fraction, not both")
        return self
