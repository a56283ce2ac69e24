"""Server-side aggregation: pure (init, aggregate) pairs with explicit state."""

from fedtune.aggregation.base import Aggregator, Contribution, weighted_mean
from fedtune.aggregation.fedavg import FedAvg, FedAvgState

AGGREGATORS = {"fedavg": FedAvg}


def build_aggregator(name: str) -> Aggregator:
    if name not in AGGREGATORS:
        raise ValueError(f"aggregation.name={name!r}; allowed: {', '.join(AGGREGATORS)}")
    return AGGREGATORS[name]()


__all__ = ["AGGREGATORS", "Aggregator", "Contribution", "FedAvg", "FedAvgState", "build_aggregator", "weighted_mean"]
