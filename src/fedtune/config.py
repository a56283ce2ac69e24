"""Experiment configuration: every default lives here; unknown keys and bad values are errors.

A config is YAML; ``key=value`` overrides use dotted paths (``federation.rounds=5``) and YAML
values (``training.lr=2e-4``, ``adapter.target_modules=[q_proj,v_proj]``).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from fedtune.config_base import Strict as _Strict
from fedtune.config_compare import CompareConfig
from fedtune.config_compression import CompressionConfig
from fedtune.config_kd import KDConfig, check_kd_fits
from fedtune.config_privacy import PrivacyConfig, check_privacy_fits
from fedtune.config_runtime import RuntimeConfig, check_placement_fits
from fedtune.config_split import SplitConfig, check_split_fits
from fedtune.config_training import TrainingConfig
from fedtune.errors import ConfigError
from fedtune.registry import AGGREGATORS, COMBINERS, PARADIGMS, PEFT_METHODS


class ModelConfig(_Strict):
    """Which base model to fine-tune."""

    name: str = Field("smollm2-135m", description="alias (smollm2-135m, tiny-llama), local dir, .gguf, or hub id")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights dtype of the base model")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit) for hub ids")
    gguf_file: str | None = Field(None, description="GGUF file name inside model.name's directory/repo")
    trust_remote_code: bool = Field(False, description="allow model code from the hub repo (only for repos you trust)")
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="where the model trains and evaluates: auto (a GPU where torch sees one and the run can use "
        "it: parameter sharing without DP-SGD, in process or deployed; else the CPU), cpu, cuda or cuda:N",
    )


DEFAULT_TARGETS = {e.name: list(e.info["targets"]) for e in PEFT_METHODS if "targets" in e.info}


class AdapterConfig(_Strict):
    """The parameter-efficient module clients train and share (docs/algorithms/peft.md)."""

    method: PEFT_METHODS.literal() = Field("lora", description=PEFT_METHODS.describe("PEFT method: "))
    r: int = Field(8, ge=1, description="LoRA rank")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; the update is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA / bottleneck dropout")
    dora: bool = Field(False, description="lora: weight-decomposed LoRA (DoRA, Liu et al. 2024)")
    target_modules: list[str] | None = Field(
        None,
        description="Linear layers the method wraps (an error lists the model's own); default per method: "
        + "; ".join(f"{m} {', '.join(t)}" for m, t in DEFAULT_TARGETS.items()),
    )
    feedforward_modules: list[str] | None = Field(
        None, description="ia3: which target_modules scale their input (MLP); default: down_proj among the targets"
    )
    num_virtual_tokens: int = Field(20, ge=1, description="prompt_tuning / prefix_tuning / p_tuning: virtual tokens")
    encoder_hidden_size: int = Field(128, ge=1, description="p_tuning: hidden size of the prompt encoder MLP")
    bottleneck_dim: int = Field(16, ge=1, description="bottleneck: width of the down/up projection")
    init_seed: int | None = Field(None, description="seed of the initial adapter; default: top-level seed")
    client_ranks: list[int] | None = Field(
        None,
        description="heterogeneous ranks: client i trains rank client_ranks[i % len] (each <= r, the global rank)",
    )

    @model_validator(mode="after")
    def _fits_method(self) -> AdapterConfig:
        if self.method != "lora":
            if self.dora:
                raise ValueError(f"adapter.dora is a LoRA option; adapter.method is {self.method!r}")
            if self.client_ranks is not None:
                raise ValueError(
                    f"adapter.client_ranks (heterogeneous LoRA ranks) needs method lora, not {self.method!r}"
                )
        if self.target_modules is not None and self.method not in DEFAULT_TARGETS:
            raise ValueError(
                f"adapter.target_modules does not apply to method {self.method!r} "
                f"(it applies to {', '.join(DEFAULT_TARGETS)}); remove it"
            )
        if self.feedforward_modules is not None and self.method != "ia3":
            raise ValueError("adapter.feedforward_modules applies to method ia3 only; remove it")
        return self

    def targets(self) -> list[str]:
        """target_modules, or the method's default ([] for methods that wrap no layers)."""
        return list(self.target_modules if self.target_modules is not None else DEFAULT_TARGETS.get(self.method, []))

    def is_lora(self) -> bool:
        return self.method == "lora"

    @model_validator(mode="after")
    def _ranks_fit(self) -> AdapterConfig:
        if self.client_ranks is not None:
            if not self.client_ranks or min(self.client_ranks) < 1:
                raise ValueError("adapter.client_ranks must be a non-empty list of ranks >= 1")
            if max(self.client_ranks) > self.r:
                raise ValueError(
                    f"adapter.client_ranks {self.client_ranks} exceed adapter.r={self.r}, the global rank; "
                    f"set adapter.r={max(self.client_ranks)}"
                )
        return self

    def joint_misfit(self) -> str | None:
        """What keeps several clients' adapters of this kind from one forward with rows routed per client."""
        if not self.is_lora():
            return f"adapter.method {self.method} (joint training routes LoRA's rows)"
        if self.dora:
            return "adapter.dora (DoRA's weight norm is not row-separable)"
        if self.dropout > 0:
            return f"adapter.dropout={self.dropout} (a client trained with others would draw other masks)"
        if self.client_ranks is not None:
            return "adapter.client_ranks (clients of different ranks)"
        return None

    def rank_of_client(self, client_id: int) -> int:
        return self.r if self.client_ranks is None else self.client_ranks[client_id % len(self.client_ranks)]


class BuiltinTasksConfig(_Strict):
    """Size and mix of the generated built-in dataset (``data.dataset: builtin:tasks``)."""

    tasks: list[Literal["arithmetic", "unit_conversion", "string_transform", "max_of_list"]] = Field(
        default_factory=lambda: ["arithmetic", "unit_conversion", "string_transform", "max_of_list"],
        description="task families to generate (each example's task field names it)",
    )
    train_per_task: int = Field(400, ge=1, description="training examples per task")
    eval_per_task: int = Field(25, ge=1, description="held-out examples per task (never in training)")
    public_per_task: int = Field(
        100, ge=1, description="paradigm kd: public examples per task (never in training or evaluation)"
    )


class DataConfig(_Strict):
    """Where examples come from and how they become token sequences."""

    dataset: str = Field(
        "builtin:tasks", description="builtin:tasks, or a .jsonl/.json/.parquet file or saved HF dataset"
    )
    eval_dataset: str | None = Field(None, description="held-out file; default: split eval_fraction off dataset")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="held-out share of dataset when no eval_dataset")
    public_dataset: str | None = Field(
        None, description="paradigm kd: the public set every party may see (a local file); default built-in"
    )
    template: Literal["auto", "chat", "alpaca"] = Field("auto", description="auto: tokenizer's chat template if any")
    system_prompt: str | None = Field(None, description="system turn added to every prompt (train and eval)")
    max_seq_len: int = Field(256, ge=8, description="longer examples lose the start of the prompt")
    train_on_prompt: bool = Field(False, description="loss on prompt tokens too (default: response only)")
    builtin: BuiltinTasksConfig = Field(default_factory=BuiltinTasksConfig)
    split_seed: int | None = Field(
        None, description="seeds the held-out split and the partition across clients; default: the top-level seed"
    )


class PartitionConfig(_Strict):
    """How the training examples are split across clients (deterministic by seed)."""

    method: Literal["iid", "dirichlet", "by_field", "quantity_skew"] = Field("iid", description="see docs/data.md")
    num_clients: int = Field(4, ge=1, description="number of clients in the federation")
    field: str | None = Field(None, description="record field for dirichlet/by_field (e.g. task)")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (dirichlet, quantity_skew)")
    min_examples: int = Field(1, ge=1, description="a client with fewer examples is an error")
    holdout_fraction: float = Field(0.0, ge=0, lt=1, description="per-client held-out share for per-client eval")

    @model_validator(mode="after")
    def _field_needed(self) -> PartitionConfig:
        if self.method in ("dirichlet", "by_field") and not self.field:
            raise ValueError(f"partition.field is required when partition.method={self.method!r} (e.g. task)")
        return self


class FederationConfig(_Strict):
    """Rounds and who takes part in each."""

    rounds: int = Field(5, ge=1, description="communication rounds")
    clients_per_round: int | None = Field(None, ge=1, description="count sampled per round; default all")
    fraction: float | None = Field(None, gt=0, le=1, description="alternative to clients_per_round")
    min_clients: int = Field(1, ge=1, description="fewer good replies than this stops the run")
    round_timeout_s: float | None = Field(
        None,
        gt=0,
        description="deadline for replies in a round (ray, flower); late clients count as dropped; "
        "unset: none with ray, 3600 s in a deployment",
    )
    max_client_examples: int | None = Field(
        None,
        ge=1,
        description="the most training examples one client can count for in aggregation (tokens weighting: this "
        "× data.max_seq_len tokens); a larger report counts as the cap. unset: the largest partition in "
        "simulation, 1,000,000 in a deployment, where the server cannot see the clients' data",
    )

    @model_validator(mode="after")
    def _one_of(self) -> FederationConfig:
        if self.clients_per_round is not None and self.fraction is not None:
            raise ValueError("set federation.clients_per_round or federation.fraction, not both")
        return self


class AggregationConfig(_Strict):
    """Server-side aggregation: clip -> combine -> server optimizer (docs/algorithms/)."""

    name: AGGREGATORS.literal() = Field(
        "fedavg", description=AGGREGATORS.describe("server optimizer applied to the combined update: ")
    )
    weighting: Literal["examples", "tokens", "uniform"] = Field(
        "examples", description="client weight: training examples, target tokens, or equal"
    )
    server_lr: float | None = Field(
        None, gt=0, description="server learning rate η; default 1 (fedavg/m), 0.01 (FedOpt)"
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="fedavgm: server momentum β")
    beta1: float = Field(0.9, ge=0, lt=1, description="FedOpt: first-moment decay β1")
    beta2: float = Field(0.99, ge=0, lt=1, description="fedadam/fedyogi: second-moment decay β2")
    tau: float = Field(1e-3, gt=0, description="FedOpt: adaptivity τ (second moments start at τ²)")
    bias_correction: bool = Field(False, description="FedOpt: Adam-style bias correction (not in the paper)")
    combine: COMBINERS.literal() = Field("mean", description=COMBINERS.describe("how client updates become one: "))
    trim_fraction: float = Field(0.1, ge=0, lt=0.5, description="trimmed_mean: share cut at each end per coordinate")
    byzantine: int = Field(0, ge=0, description="krum: number f of clients assumed malicious")
    krum_select: int = Field(1, ge=1, description="krum: how many best-scored updates to average (1 = Krum)")
    clip_norm: float | None = Field(None, gt=0, description="scale every update down to this L2 norm first")
    scaffold: bool = Field(False, description="SCAFFOLD control variates (server c, per-client c_i)")
    lora: Literal["auto", "exact", "naive", "ffa"] = Field(
        "auto",
        description="LoRA aggregation: exact (mean of B·A, rank-r SVD; FlexLoRA with client_ranks), naive (A, B "
        "averaged apart, error reported; HetLoRA zero-padding with client_ranks), ffa (A frozen, exact); auto: exact "
        "when name=fedavg, combine=mean, no scaffold, else naive",
    )
    max_update_norm: float | None = Field(
        None, gt=0, description="reject (drop and log) any update whose L2 norm exceeds this"
    )

    @model_validator(mode="after")
    def _lora_exact_fits(self) -> AggregationConfig:
        if self.lora == "exact" and not self.exact_lora_compatible():
            raise ValueError(
                "aggregation.lora=exact aggregates LoRA products with FedAvg (name=fedavg, server_lr 1, "
                "combine=mean, no scaffold); for other settings use lora=naive (inexact, error reported) "
                "or lora=ffa (exact, A frozen)"
            )
        return self

    def exact_lora_compatible(self) -> bool:
        return self.name == "fedavg" and self.combine == "mean" and not self.scaffold and self.server_lr in (None, 1.0)

    def lora_mode(self) -> str:
        """The LoRA aggregation actually used ('auto' resolved)."""
        if self.lora != "auto":
            return self.lora
        return "exact" if self.exact_lora_compatible() else "naive"


class EvaluationConfig(_Strict):
    """Held-out evaluation of the global model."""

    every: int = Field(1, ge=0, description="evaluate every N rounds (0: only at the end)")
    at_start: bool = Field(True, description="evaluate the base model as round 0")
    max_samples: int | None = Field(None, ge=1, description="cap on held-out examples")
    batch_size: int = Field(16, ge=1, description="sequences per evaluation batch")
    exact_match: Literal["auto", True, False, "final"] = Field(
        "auto",
        description="greedy-generation exact-match accuracy; auto: on for the built-in data; final: only after "
        "the last round (the loss is still evaluated every time: generation is most of an evaluation's cost)",
    )
    max_new_tokens: int = Field(24, ge=1, description="greedy generation length for exact-match")
    group_by: str | None = Field("task", description="report accuracy per value of this field, if present")
    per_client: bool = Field(False, description="also evaluate on each client's held-out share")


class OutputConfig(_Strict):
    """Where the run directory goes."""

    dir: str = Field("runs", description="parent directory of run directories")
    name: str | None = Field(None, description="run directory name; default: the config file's stem")
    keep_checkpoints: int | None = Field(None, ge=1, description="keep the last N round checkpoints (default all)")
    progress: bool = Field(True, description="progress bars")


class ExperimentConfig(_Strict):
    """One federated fine-tuning experiment."""

    seed: int = Field(0, description="seeds the initial adapter, partitions, client sampling and local batches")
    paradigm: PARADIGMS.literal() = Field("parameter_sharing", description=PARADIGMS.describe("how clients federate: "))
    model: ModelConfig = Field(default_factory=ModelConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    aggregation: AggregationConfig = Field(default_factory=AggregationConfig)
    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    kd: KDConfig = Field(default_factory=KDConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    compare: CompareConfig = Field(default_factory=CompareConfig)

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
        if self.training.gradient_checkpointing and (self.paradigm == "split" or self.privacy.dp_sgd is not None):
            raise ValueError(
                "training.gradient_checkpointing does not combine with "
                + (
                    "paradigm: split (its clients hold a block or two and count their compute per part)"
                    if self.paradigm == "split"
                    else "privacy.dp_sgd (Opacus's per-example hooks would see the recomputed forward twice)"
                )
                + "; remove it"
            )
        if self.evaluation.per_client and self.partition.holdout_fraction == 0:
            raise ValueError("evaluation.per_client needs partition.holdout_fraction > 0 (e.g. 0.1)")
        self._paradigm_fits()
        return self

    def _paradigm_fits(self) -> None:
        """Settings of one paradigm are errors under another, rather than silently ignored."""
        if self.paradigm != "split" and self.split != SplitConfig():
            raise ValueError(
                f"the split section applies to paradigm: split (this config's paradigm is {self.paradigm})"
            )
        if self.paradigm == "split":
            check_split_fits(self)
        check_kd_fits(self)
        check_privacy_fits(self)
        check_placement_fits(self)

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


# ---------------------------------------------------------------- loading and overrides


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read YAML, apply ``key=value`` overrides, validate; raise ConfigError naming the bad key."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        raw = loaded
    for item in overrides or []:
        apply_override(raw, item)
    return validate_config(raw, source)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` in a nested dict; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value (e.g. federation.rounds=5)")
    key, _, text = item.partition("=")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from exc
    set_dotted(raw, key, value, f"override {item!r}")


def set_dotted(raw: dict[str, Any], key: str, value: Any, what: str, merge: bool = False) -> None:
    """Set ``raw[a][b][c] = value`` for ``key`` "a.b.c"; with ``merge``, a mapping value is set key by key
    into an existing section instead of replacing it. ``what`` names the setting in errors."""
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"{what}: empty key segment in {key!r}")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{what}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    if merge and isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
        for k, v in value.items():
            set_dotted(node[parts[-1]], str(k), v, what, merge)
        return
    node[parts[-1]] = value


def validate_config(raw: dict[str, Any], source: str = "config") -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(err) for err in exc.errors()]
        raise ConfigError(f"{source}: invalid configuration:\n  " + "\n  ".join(lines)) from None


def _describe(err: dict[str, Any]) -> str:
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        close = difflib.get_close_matches(loc[-1], allowed, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        return f"unknown key '{key}'.{hint} Allowed keys here: {', '.join(allowed)}"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "value_error" and not loc:
        return msg
    return f"'{key}': {msg} (got {err.get('input')!r})"


def _allowed_keys(loc: list[str]) -> list[str]:
    model: type[BaseModel] = ExperimentConfig
    for part in loc:
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def to_yaml(config: ExperimentConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def config_diff(a: ExperimentConfig, b: ExperimentConfig) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two configs."""
    out: dict[str, tuple[Any, Any]] = {}

    def walk(x: Any, y: Any, prefix: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k), y.get(k), f"{prefix}{k}.")
        elif x != y:
            out[prefix.rstrip(".")] = (x, y)

    walk(a.model_dump(mode="json"), b.model_dump(mode="json"), "")
    return out
