"""Parameter sharing (FedLLM): clients send adapter updates, the server aggregates them."""

from fedtune.config.paradigm import Capabilities, Paradigm, ParadigmConfig


class ParameterSharingConfig(ParadigmConfig):
    """Parameter sharing (paradigm parameter_sharing): its settings are the shared sections it reads."""


PARADIGM = Paradigm(
    name="parameter_sharing",
    summary="clients train adapters and send their updates; the server aggregates them (FedAvg family)",
    settings=ParameterSharingConfig,
    reads=("adapter", "training", "aggregation", "compression", "privacy"),
    capabilities=Capabilities(
        gpu=True,
        joint=True,
        client_dp=True,
        secure_agg=True,
        dp_sgd=True,
        per_client_eval=True,
        gradient_checkpointing=True,
        zeroth_order=True,
        quantised_base=True,
        continues_mid_round=True,  # secure aggregation's exchanges go on from what the round's training left
    ),
    setup="fedtune.paradigms.parameter_sharing.setup",
    docs="docs/algorithms/fedavg.md",
)
