"""KD-FedLLM: clients share top-k token distributions on a public set instead of weights."""

from fedtune.config.paradigm import Capabilities, Paradigm
from fedtune.paradigms.kd.settings import KDConfig, check

PARADIGM = Paradigm(
    name="kd",
    summary="clients send top-k token probabilities on a public set; the server forms their consensus",
    settings=KDConfig,
    # a consensus of token distributions: no server optimizer, no update-shaped codecs, no FedProx
    reads=(
        "adapter",
        "-adapter.client_ranks",
        "training",
        "-training.proximal_mu",
        "compression.uplink",
        "compression.downlink",
        "data.public_dataset",
        "data.builtin.public_per_task",
    ),
    capabilities=Capabilities(per_client_eval=True, gradient_checkpointing=True),
    setup="fedtune.paradigms.kd.setup",
    check=check,
    docs="docs/algorithms/kd.md",
)
