"""FedKSeed: full-parameter or adapter tuning by zeroth-order steps whose directions come from K candidate
seeds; clients send (index, scalar) pairs and every party rebuilds the weights by replaying them."""

from fedtune.config.paradigm import Capabilities, Paradigm
from fedtune.paradigms.fedkseed.settings import FedKSeedConfig, check

PARADIGM = Paradigm(
    name="fedkseed",
    summary="clients take zeroth-order steps along K candidate seeds and send (index, scalar) pairs; every "
    "party rebuilds the weights by replaying them (FedKSeed)",
    settings=FedKSeedConfig,
    # the adapter (any method, `blocks` for every weight of chosen blocks), the zeroth-order training, FedAvg's
    # weighting; no codecs (a step is two numbers), no server optimizer
    reads=("adapter", "-adapter.client_ranks", "training", "-training.proximal_mu", "aggregation.weighting"),
    capabilities=Capabilities(zeroth_order=True),
    setup="fedtune.paradigms.fedkseed.setup",
    check=check,
    docs="docs/algorithms/zeroth_order.md",
)
