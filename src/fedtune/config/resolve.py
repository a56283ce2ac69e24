"""The one step that turns ``auto`` settings that depend only on the config into what they mean.

Validation only checks; ``resolve`` runs after it and returns a new config, which a run saves, so a
resumed run reads the same values. Settings that depend on the machine (``model.device``,
``runtime.lanes``, ``runtime.joint_clients``) are resolved where a process places its work
(``fedtune.models.placement``), never saved.
"""

from __future__ import annotations

from fedtune.config.experiment import ExperimentConfig


def resolve(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with its config-determined ``auto`` values resolved; the same object when there are none.

    The paradigm's own ``resolve`` (``Paradigm.resolve``) runs first.

    With client-level DP or secure aggregation, server-side updates are summed: aggregation.lora auto
    becomes ffa (FFA-LoRA: only B is averaged, so a sum of updates stays exact) and every client counts
    once (aggregation.weighting uniform).
    """
    own = cfg.plugin().resolve
    if own is not None:
        cfg = own(cfg)  # the paradigm's own defaults first: what follows reads them
    p, agg = cfg.privacy, cfg.aggregation
    if not (p.on() or p.secure_aggregation is not None):
        return cfg
    update: dict[str, str] = {}
    if cfg.adapter.is_lora() and agg.lora == "auto":
        update["lora"] = "ffa"
    if agg.weighting != "uniform" or "weighting" not in agg.model_fields_set:
        update["weighting"] = "uniform"
    if not update:
        return cfg
    return cfg.model_copy(update={"aggregation": agg.model_copy(update=update)})
