"""One experiment: every section, and every rule that spans sections.

A section's own rules live with it (``config/training.py`` checks steps against epochs); a rule that
reads two sections lives here, in ``ExperimentConfig``'s checks. What a paradigm supports is asked of
the paradigm (``config/paradigm.py``), never tested by name. Validation changes nothing: ``auto``
values are resolved afterwards, in one explicit step (``config/resolve.py``).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, SerializeAsAny, WrapValidator, model_validator

from fedtune.config.adapter import AdapterConfig
from fedtune.config.aggregation import AggregationConfig
from fedtune.config.base import Strict, changed_keys
from fedtune.config.compare import CompareConfig
from fedtune.config.compression import CompressionConfig
from fedtune.config.data import DataConfig, PartitionConfig
from fedtune.config.evaluation import EvaluationConfig
from fedtune.config.federation import FederationConfig
from fedtune.config.model import ModelConfig
from fedtune.config.output import OutputConfig
from fedtune.config.paradigm import Capabilities, Paradigm, ParadigmConfig, paradigm_of
from fedtune.config.privacy import PrivacyConfig
from fedtune.config.runtime import RuntimeConfig
from fedtune.config.training import TrainingConfig
from fedtune.config.tune import TuneConfig
from fedtune.core.registry import PARADIGMS

DEFAULT_PARADIGM = "parameter_sharing"
# keys only some paradigms use: one that is set must be read by the run's paradigm (``Paradigm.reads``)
PARADIGM_KEYS = (
    "adapter",
    "training",
    "aggregation",
    "compression",
    "privacy",
    "data.public_dataset",
    "data.builtin.public_per_task",
)


def _paradigm_section(value: Any, handler: Any) -> ParadigmConfig:
    """``paradigm``: a name, or a mapping whose ``name`` picks the settings model the rest is validated by."""
    if isinstance(value, ParadigmConfig):
        return value
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        raise ValueError("give a paradigm name, or a mapping {name: NAME, ...its settings}")
    name = value.get("name", DEFAULT_PARADIGM)
    if not isinstance(name, str):
        raise ValueError(f"paradigm.name must be a name, got {name!r}")
    return paradigm_of(name).settings.model_validate({**value, "name": name})


def _default_paradigm() -> ParadigmConfig:
    return paradigm_of(DEFAULT_PARADIGM).settings()


class ExperimentConfig(Strict):
    """One federated fine-tuning experiment."""

    seed: int = Field(0, ge=0, description="seeds the initial adapter, partitions, client sampling and local batches")
    paradigm: Annotated[SerializeAsAny[ParadigmConfig], WrapValidator(_paradigm_section)] = Field(
        default_factory=_default_paradigm,
        description="how clients federate: {name: NAME, ...its settings} (the sections below), or just NAME; "
        "a paradigm outside fedtune by its import path, package.module:ATTRIBUTE",
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    aggregation: AggregationConfig = Field(default_factory=AggregationConfig)
    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    compare: CompareConfig = Field(default_factory=CompareConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)

    @model_validator(mode="before")
    @classmethod
    def _legacy_sections(cls, data: Any) -> Any:
        """The earlier form ``paradigm: kd`` with a ``kd:`` section (what run directories saved): the section
        named after the chosen paradigm becomes its settings; one named after another paradigm must hold
        only that paradigm's defaults (a saved config lists every section)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        chosen = data.get("paradigm", DEFAULT_PARADIGM)
        name = chosen.get("name", DEFAULT_PARADIGM) if isinstance(chosen, dict) else chosen
        for legacy in [k for k in data if k not in cls.model_fields and k in PARADIGMS]:
            section = data.pop(legacy)
            if section in (None, {}):
                continue
            if not isinstance(section, dict):
                raise ValueError(f"the {legacy} section must be a mapping")
            if legacy == name:
                given = {"name": name} if isinstance(chosen, str) else dict(chosen)
                clash = sorted(k for k in section if k in given and given[k] != section[k])
                if clash:
                    raise ValueError(f"paradigm.{clash[0]} and {legacy}.{clash[0]} differ; keep paradigm.{clash[0]}")
                data["paradigm"] = {**section, **given}
            elif paradigm_of(legacy).settings(**section) != paradigm_of(legacy).settings():
                raise ValueError(
                    f"the {legacy} section applies to paradigm {legacy} (this config's paradigm is {name}); "
                    f"remove it, or write paradigm: {{name: {legacy}, ...}}"
                )
        return data

    @model_validator(mode="after")
    def _cross_checks(self) -> ExperimentConfig:
        n = self.partition.num_clients
        if self.federation.clients_per_round is not None and self.federation.clients_per_round > n:
            raise ValueError(
                f"federation.clients_per_round={self.federation.clients_per_round} exceeds partition.num_clients={n}"
            )
        if self.federation.min_clients > n:
            raise ValueError(f"federation.min_clients={self.federation.min_clients} exceeds partition.num_clients={n}")
        if self.adapter.client_ranks is not None:
            agg = self.aggregation
            if agg.lora_mode() == "ffa" or not agg.exact_lora_compatible():
                raise ValueError(
                    "adapter.client_ranks (heterogeneous LoRA ranks) works with FedAvg over LoRA products: "
                    "aggregation.name=fedavg, combine=mean, no scaffold, and aggregation.lora exact (FlexLoRA "
                    "SVD redistribution, the default) or naive (HetLoRA zero-padding)"
                )
        if not self.adapter.is_lora() and self.aggregation.lora != "auto":
            raise ValueError(
                f"aggregation.lora={self.aggregation.lora} is LoRA-aware aggregation, but adapter.method is "
                f"{self.adapter.method!r}, whose tensors are aggregated as they are; remove aggregation.lora"
            )
        if self.compression.downlink_updates and self.adapter.client_ranks is not None:
            raise ValueError(
                "compression.downlink_updates needs one adapter rank for all clients (adapter.client_ranks unset): "
                "every client must start from the same initial adapter"
            )
        if self.training.gradient_checkpointing and self.privacy.dp_sgd is not None:
            raise ValueError(
                "training.gradient_checkpointing does not combine with privacy.dp_sgd (Opacus's per-example hooks "
                "would see the recomputed forward twice); remove it"
            )
        if self.training.backprop_free and (self.aggregation.scaffold or self.privacy.dp_sgd is not None):
            what = "aggregation.scaffold" if self.aggregation.scaffold else "privacy.dp_sgd"
            raise ValueError(
                f"training.gradient={self.training.gradient} cannot be combined with {what} (both act on a "
                "gradient that steps from forward passes never form)"
            )
        if self.model.quantization != "none":
            self._quantised_base_fits()
        if self.evaluation.per_client and self.partition.holdout_fraction == 0:
            raise ValueError("evaluation.per_client needs partition.holdout_fraction > 0 (e.g. 0.1)")
        self._paradigm_fits()
        check_privacy_fits(self)
        check_placement_fits(self)
        return self

    def _quantised_base_fits(self) -> None:
        """ValueError naming what a quantised base (model.quantization) cannot be combined with."""
        from fedtune.core.registry import trains_base

        q, problems = self.model.quantization, []
        if trains_base(self.adapter.method):
            problems.append(
                f"adapter.method={self.adapter.method} (it trains the base's own tensors, which a quantised base "
                "stores frozen: use lora, ia3 or bottleneck)"
            )
        if self.privacy.dp_sgd is not None:
            problems.append("privacy.dp_sgd (Opacus's per-example hooks do not cover bitsandbytes layers)")
        if self.model.dtype == "float16" and q == "nf4":
            problems.append("model.dtype=float16 (use bfloat16 or float32 as the 4-bit layers' compute dtype)")
        if problems:
            raise ValueError(f"model.quantization={q} cannot be combined with " + "; ".join(problems))

    def _paradigm_fits(self) -> None:
        """What the paradigm does not support, or keys it does not read, are errors rather than ignored."""
        plugin = self.plugin()
        refused = refusals(plugin.capabilities, self)
        if refused:
            raise ValueError(f"paradigm {plugin.name} does not support {'; '.join(refused)}")
        unread = [k for k in self.paradigm_keys_set() if not plugin.reads_key(k)]
        if unread:
            raise ValueError(
                f"paradigm {plugin.name} does not read {', '.join(unread)} (see {plugin.docs or 'its docs'}); "
                f"remove {'it' if len(unread) == 1 else 'them'}"
            )
        if plugin.check is not None:
            plugin.check(self)

    def paradigm_keys_set(self) -> list[str]:
        """The paradigm-dependent keys (``PARADIGM_KEYS``) this config sets to other than their defaults."""
        out = []
        for section in dict.fromkeys(k.split(".")[0] for k in PARADIGM_KEYS):
            for key in changed_keys(getattr(self, section)):
                full = f"{section}.{key}"
                if any(full == p or full.startswith(p + ".") for p in PARADIGM_KEYS):
                    out.append(full)
        return out

    def plugin(self) -> Paradigm:
        """The paradigm this config runs."""
        return self.paradigm.plugin()

    def split_seed(self) -> int:
        """The seed of the data's held-out split and partition (fedtune compare keeps it across seeds)."""
        return self.data.split_seed if self.data.split_seed is not None else self.seed

    def clients_per_round(self) -> int:
        n = self.partition.num_clients
        if self.federation.clients_per_round is not None:
            return self.federation.clients_per_round
        if self.federation.fraction is not None:
            return max(1, round(self.federation.fraction * n))
        return n


def refusals(caps: Capabilities, cfg: ExperimentConfig) -> list[str]:
    """The settings of ``cfg`` that ask for something a paradigm with ``caps`` lacks, each with its key."""
    p, r = cfg.privacy, cfg.runtime
    asked = [
        (not caps.gpu and cfg.model.device.startswith("cuda"), f"a GPU (model.device={cfg.model.device})"),
        (not caps.lanes and isinstance(r.lanes, int) and r.lanes > 1, f"lanes (runtime.lanes={r.lanes})"),
        (
            not caps.joint and r.joint_clients not in (1, "auto"),
            f"joint training (runtime.joint_clients={r.joint_clients})",
        ),
        (not caps.client_dp and p.client_dp != "off", f"client-level DP (privacy.client_dp={p.client_dp})"),
        (
            not caps.secure_agg and p.secure_aggregation is not None,
            "secure aggregation (privacy.secure_aggregation)",
        ),
        (not caps.dp_sgd and p.dp_sgd is not None, "DP-SGD (privacy.dp_sgd)"),
        (
            not caps.per_client_eval and cfg.evaluation.per_client,
            "evaluation on each client's held-out share (evaluation.per_client)",
        ),
        (
            not caps.gradient_checkpointing and cfg.training.gradient_checkpointing,
            "gradient checkpointing (training.gradient_checkpointing)",
        ),
        (
            not caps.zeroth_order and cfg.training.backprop_free,
            f"training without backpropagation (training.gradient={cfg.training.gradient})",
        ),
        (
            not caps.quantised_base and cfg.model.quantization != "none",
            f"a quantised base (model.quantization={cfg.model.quantization})",
        ),
        (r.name not in caps.runtimes, f"runtime.name={r.name} (it runs under {', '.join(caps.runtimes)})"),
    ]
    return [what for refused, what in asked if refused]


def check_privacy_fits(cfg: ExperimentConfig) -> None:
    """ValueError naming what the privacy settings cannot be combined with in ``cfg`` (the paradigm's part is
    its capabilities). Resolving aggregation.lora and the weighting under privacy is ``resolve``'s."""
    p = cfg.privacy
    if not p.any():
        return
    server_side = p.on() or p.secure_aggregation is not None
    what = "privacy.client_dp" if p.on() else "privacy.secure_aggregation" if server_side else "privacy.dp_sgd"
    if p.dp_sgd is not None:
        _check_dp_sgd(cfg)
    if not server_side:
        return  # DP-SGD alone changes nothing on the server
    n = cfg.partition.num_clients
    if p.on() and p.delta >= 1 / n:
        raise ValueError(
            f"privacy.delta={p.delta} is not below 1 / partition.num_clients = {1 / n:.4g}: a guarantee with "
            "such a delta allows revealing a whole client's data; use a smaller delta (e.g. 1e-5)"
        )
    agg = cfg.aggregation
    problems = []
    if agg.combine != "mean":
        problems.append(f"aggregation.combine={agg.combine} (robust combiners are not a sum the noise can protect)")
    if agg.scaffold:
        problems.append("aggregation.scaffold (control variates are per-client values sent in the clear)")
    if agg.clip_norm is not None and p.on():
        problems.append("aggregation.clip_norm (privacy.clip_norm is the clipping norm)")
    if p.secure_aggregation is not None:
        c = cfg.compression
        if c.uplink or c.error_feedback:
            problems.append("compression.uplink (secure aggregation encodes updates as fixed-point sums itself)")
        if agg.clip_norm is not None:
            problems.append("aggregation.clip_norm (the server cannot clip what it cannot see)")
        if c.downlink_updates:
            problems.append("compression.downlink_updates")
    if "weighting" in agg.model_fields_set and agg.weighting != "uniform":
        problems.append(f"aggregation.weighting={agg.weighting} (every client counts once here: uniform)")
    if cfg.adapter.client_ranks is not None:
        problems.append("adapter.client_ranks (heterogeneous ranks need factor-wise aggregation)")
    if cfg.adapter.is_lora() and agg.lora == "exact":
        problems.append(
            "aggregation.lora=exact (it factorises the mean of B·A, which is not a sum of clipped updates): "
            "use ffa (exact under a sum, the default with privacy) or naive"
        )
    if cfg.adapter.is_lora() and agg.lora == "naive" and p.secure_aggregation is not None:
        problems.append("aggregation.lora=naive (its error needs each client's factors): use ffa, the default")
    if problems:
        raise ValueError(f"{what} cannot be combined with " + "; ".join(problems))


def _check_dp_sgd(cfg: ExperimentConfig) -> None:
    t = cfg.training
    problems = []
    if t.grad_accum != 1:
        problems.append("training.grad_accum (each step's batch is one Poisson sample)")
    if t.proximal_mu:
        problems.append("training.proximal_mu (FedProx's gradient term is not clipped per example)")
    if cfg.aggregation.scaffold:
        problems.append("aggregation.scaffold (SCAFFOLD's correction is not clipped per example)")
    if t.local_steps is None:
        problems.append("training.local_epochs (DP-SGD counts local_steps of Poisson-sampled batches)")
    if problems:
        raise ValueError("privacy.dp_sgd cannot be combined with " + "; ".join(problems))


def gpu_misfit(cfg: ExperimentConfig) -> str | None:
    """What in ``cfg`` keeps its model off a GPU (None: nothing)."""
    if not cfg.plugin().capabilities.gpu:
        return f"paradigm {cfg.paradigm.name} (its exchanges run on the CPU so far)"
    if cfg.privacy.dp_sgd is not None:
        return "privacy.dp_sgd (its noise generator is a CPU one so far)"
    if cfg.runtime.name == "ray":
        return "runtime ray (its workers share the driver's base weights through host memory)"
    return None


def joint_misfit(cfg: ExperimentConfig) -> str | None:
    """What in ``cfg`` keeps its clients from training jointly (None: nothing)."""
    if not cfg.plugin().capabilities.joint:
        return f"paradigm {cfg.paradigm.name} (it trains each client on its own)"
    if cfg.privacy.dp_sgd is not None:
        return "privacy.dp_sgd (each example is clipped on its own)"
    if cfg.training.backprop_free:
        return f"training.gradient={cfg.training.gradient} (each client's steps perturb its own adapter)"
    return cfg.adapter.joint_misfit()


def check_placement_fits(cfg: ExperimentConfig) -> None:
    """ValueError naming what in ``cfg`` an explicit model.device or runtime.joint_clients does not combine with."""
    device, lanes = cfg.model.device, cfg.runtime.lanes
    if device.startswith("cuda"):
        why = gpu_misfit(cfg)
        if why is not None:
            raise ValueError(f"model.device={device} does not combine with {why}; use cpu or auto")
        if isinstance(lanes, int) and lanes > 1:
            raise ValueError(
                f"model.device={device} with runtime.lanes={lanes}: lanes are forked processes, and CUDA does not "
                "survive a fork; use lanes=1 or auto (clients share a GPU through runtime.joint_clients)"
            )
    joint = cfg.runtime.joint_clients
    if joint not in (1, "auto") and (why := joint_misfit(cfg)) is not None:
        raise ValueError(f"runtime.joint_clients={joint} does not combine with {why}; remove it")
