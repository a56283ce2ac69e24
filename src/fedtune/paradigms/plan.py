"""What a paradigm's halves are built from: the run's plan (config sections, resolved) and a process's workbench.

``assembly`` makes both, the same way in every process (the server, each Ray worker, each deployed
client), so the halves built from them agree bit for bit. A paradigm sees sections, never the whole
``ExperimentConfig``; by the time it does, the config has refused any paradigm-dependent key set that
its declaration does not read (``config.experiment``), so what it finds in them is defaults or its own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from fedtune.adapters.adapter_model import AdapterModel
from fedtune.adapters.build import AdapterRecipe
from fedtune.client.data import EvalSettings
from fedtune.client.schedule import UpdateBound
from fedtune.config.adapter import AdapterConfig
from fedtune.config.aggregation import AggregationConfig
from fedtune.config.compression import CompressionConfig
from fedtune.config.data import DataConfig
from fedtune.config.model import ModelConfig
from fedtune.config.paradigm import ParadigmConfig
from fedtune.config.privacy import PrivacyConfig
from fedtune.config.training import TrainingConfig
from fedtune.core.types import Params
from fedtune.data.tokenize import Encoder
from fedtune.models.placement import Placement
from fedtune.privacy.plan import PrivacyPlan
from fedtune.wire.link import Link

log = logging.getLogger("fedtune")


@dataclass(frozen=True)
class ParadigmPlan:
    """The resolved config as a paradigm receives it, and what the run decided once (privacy, placement)."""

    settings: ParadigmConfig  # the paradigm's own section
    seed: int
    split_seed: int  # the data split's seed (held-out split, partition)
    rounds: int  # federation.rounds: what schedules are laid out over
    num_clients: int
    clients_per_round: int
    model: ModelConfig
    adapter: AdapterConfig
    data: DataConfig
    training: TrainingConfig
    aggregation: AggregationConfig
    compression: CompressionConfig
    privacy: PrivacyConfig
    privacy_plan: PrivacyPlan | None  # client-level DP's noise and budget (None: off), planned once per run
    placement: Placement
    progress: bool  # progress bars

    @property
    def rounds_to_run(self) -> int:
        """federation.rounds, or fewer when privacy.target_epsilon is spent sooner."""
        return self.rounds if self.privacy_plan is None else self.privacy_plan.rounds

    def update_bound(self, max_examples: int, start: Params, what: str = "the adapter") -> float | UpdateBound | None:
        """``aggregation.max_update_norm`` as the server applies it: a number, None, or for auto the bound of
        honest training (``client.schedule.UpdateBound``) on clients of at most ``max_examples`` examples;
        said in the log either way, for auto with its value in round 1 on ``start`` (the part it bounds)."""
        setting = self.aggregation.max_update_norm
        if setting != "auto":
            if setting is None:
                log.warning("aggregation.max_update_norm=null: no update is refused for its size")
            return setting
        bound, why = UpdateBound.of(self.training, self.rounds, max_examples, self.privacy.dp_sgd is not None)
        if bound is None:
            log.warning("aggregation.max_update_norm=auto bounds nothing here: %s; set a number", why)
            return None
        t = self.training
        log.info(
            "aggregation.max_update_norm=auto: an update of %s larger than %d %s steps at peak lr %g can make "
            "drops its client (round 1, from the initial adapter: %.4g)",
            what,
            bound.steps,
            t.optimizer,
            t.lr,
            bound.on(1, start),
        )
        return bound

    def adapter_recipe(self) -> AdapterRecipe:
        """How every process builds the base model with its seeded adapter (``adapters.build``)."""
        a = self.adapter
        return AdapterRecipe(
            self.model,
            a,
            a.init_seed if a.init_seed is not None else self.seed,
            tuple(a.rank_of_client(c) for c in range(self.num_clients)),
            freeze_a=a.is_lora() and self.aggregation.lora_mode() == "ffa",
            checkpointing=self.training.gradient_checkpointing,
            device=self.placement.device,
        )


@dataclass
class Workbench:
    """One process's model side: the base model with its adapter, and how text and tensors are encoded."""

    adapter: AdapterModel | None  # None in a client process of a paradigm whose clients are sent their model
    tokenizer: PreTrainedTokenizerBase
    encoder: Encoder
    initial: Params  # the seeded initial adapter: what every client holds before round 1
    uplink: Link
    downlink: Link
    eval_settings: EvalSettings
