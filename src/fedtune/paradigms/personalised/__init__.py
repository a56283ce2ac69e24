"""Personalised FL: each client keeps a personal adapter beside the federation's (FedPer, FedRep, Ditto, pFedMe).

The federation is parameter sharing's round (this paradigm extends it) on what is shared: the adapter's shared
part (FedPer, FedRep), the global adapter (Ditto) or each client's local copy (pFedMe). Each client keeps its
personal tensors in its own state (``personal``); clients evaluate their personalised model on their held-out
share beside the global one.
"""

from fedtune.config.paradigm import Capabilities, Paradigm
from fedtune.paradigms.personalised.settings import PersonalisedConfig, check

PARADIGM = Paradigm(
    name="personalised",
    summary="each client keeps a personal adapter beside the federation's (FedPer, FedRep, Ditto, pFedMe), "
    "evaluated on its own held-out share beside the global one",
    settings=PersonalisedConfig,
    # parameter sharing's keys; one adapter rank (no client ranks)
    reads=("adapter", "-adapter.client_ranks", "training", "aggregation", "compression", "privacy"),
    capabilities=Capabilities(
        gpu=True,
        client_dp=True,
        secure_agg=True,
        dp_sgd=True,  # fedper and ditto (check: fedrep and pfedme shape steps that DP-SGD does not take)
        per_client_eval=True,
        gradient_checkpointing=True,
        continues_mid_round=True,  # secure aggregation's exchanges, as in parameter sharing
    ),
    setup="fedtune.paradigms.personalised.setup",
    check=check,
    docs="docs/algorithms/personalised.md",
    extends="parameter_sharing",
)
