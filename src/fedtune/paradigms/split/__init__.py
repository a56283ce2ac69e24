"""Split-FedLLM: the model cut between client and server; activations up, gradients down, every step."""

from fedtune.config.paradigm import Capabilities, Paradigm
from fedtune.paradigms.split.settings import SplitConfig, check

PARADIGM = Paradigm(
    name="split",
    summary="the model is cut between client and server; hidden states and their gradients cross at every local "
    "step, and each side trains its own adapter",
    settings=SplitConfig,
    reads=(
        "adapter",
        "-adapter.client_ranks",
        "training",
        "-training.proximal_mu",
        "aggregation",
        "-aggregation.scaffold",
        "compression.uplink",
        "compression.downlink",
    ),
    # clients hold a block or two and count their compute per part: no checkpointing; no held-out share to
    # evaluate on a part of the model
    capabilities=Capabilities(continues_mid_round=True),
    setup="fedtune.paradigms.split.setup",
    check=check,
    docs="docs/algorithms/split.md",
)
