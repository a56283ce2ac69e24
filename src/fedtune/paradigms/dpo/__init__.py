"""Federated DPO: clients tune the adapter on their own preference pairs, the server aggregates as FedAvg does.

Parameter sharing's round (this paradigm extends it) with each client's local loss DPO's over its pairs
(prompt, chosen, rejected), the reference model being the round's global model: its log-probabilities are
taken once at the round's start, before the first step. Held-out pairs are scored every evaluation
(``eval_reward_accuracy`` against the initial adapter, ``eval_preference_accuracy``).
"""

from fedtune.config.paradigm import Capabilities, Paradigm
from fedtune.paradigms.dpo.settings import DpoConfig, check

PARADIGM = Paradigm(
    name="dpo",
    summary="each client tunes the adapter by DPO on its own preference pairs (prompt, chosen, rejected), the "
    "round's global model its reference; held-out reward accuracy every evaluation",
    settings=DpoConfig,
    # parameter sharing's keys; one adapter rank (no client ranks)
    reads=("adapter", "-adapter.client_ranks", "training", "aggregation", "compression", "privacy"),
    capabilities=Capabilities(
        gpu=True,
        client_dp=True,
        secure_agg=True,
        per_client_eval=True,
        gradient_checkpointing=True,
        quantised_base=True,
        continues_mid_round=True,  # secure aggregation's exchanges, as in parameter sharing
    ),
    setup="fedtune.paradigms.dpo.setup",
    check=check,
    docs="docs/algorithms/dpo.md",
    extends="parameter_sharing",
)
