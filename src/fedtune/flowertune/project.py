"""A FlowerTune challenge's ``pyproject.toml`` read, checked, and made into a fedtune experiment config.

What the file sets, and what fedtune runs for it (docs/flowertune.md has the table and the differences):
the static dataset through the challenge's recipe (FlowerTune's column renames and joins) and its
Alpaca-style prompt with loss on the response only; ``options.num-supernodes`` clients, IID;
``int(clients · strategy.fraction-fit)`` of them a round (at least 2: Flower's FedAvg minimum);
``max-steps`` local steps of ``per-device-train-batch-size`` (times ``gradient-accumulation-steps``)
at ``seq-length`` tokens; FlowerTune's per-round cosine from ``learning-rate-max`` to ``-min``; LoRA
of ``peft-lora-r`` / ``peft-lora-alpha`` with dropout 0.075 on peft's default modules for the model;
FedAvg; ``num-server-rounds`` rounds. The static section may not be edited: a dataset that is none of
the four challenges' is refused, and so is an override of what the static section fixes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from fedtune.config import ExperimentConfig
from fedtune.config.loading import apply_override, validate_config
from fedtune.core.errors import ConfigError
from fedtune.core.files import flatten
from fedtune.core.registry import EVAL_KINDS
from fedtune.flowertune.challenges import CHALLENGES, Challenge, challenge_of

LORA_DROPOUT = 0.075  # FlowerTune's LoraConfig
FIXED = ("data.dataset", "data.recipe", "data.template", "partition.", "data.eval_dataset")  # the static section's
REQUIRED = {
    "model.name": str,
    "model.lora.peft-lora-r": int,
    "model.lora.peft-lora-alpha": int,
    "train.learning-rate-max": float,
    "train.learning-rate-min": float,
    "train.seq-length": int,
    "train.training-arguments.per-device-train-batch-size": int,
    "train.training-arguments.max-steps": int,
    "num-server-rounds": int,
}


@dataclass(frozen=True)
class Project:
    path: Path
    name: str
    challenge: Challenge
    config: dict[str, Any]  # [tool.flwr.app.config], dotted keys, without the static section
    static: dict[str, Any]  # [tool.flwr.app.config.static], dotted keys
    supernodes: int

    def value(self, key: str) -> Any:
        """The config value of ``key``, of the type REQUIRED says, or ConfigError naming file and key."""
        if key not in self.config:
            raise ConfigError(f"{self.path}: [tool.flwr.app.config] has no {key}; FlowerTune's template sets it")
        value, kind = self.config[key], REQUIRED.get(key)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise ConfigError(f"{self.path}: [tool.flwr.app.config] {key} = {value!r} must be a {kind.__name__}")
        return value


def read_project(path: str | Path) -> Project:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: give a FlowerTune challenge's pyproject.toml")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    app = data.get("tool", {}).get("flwr", {}).get("app", {}).get("config")
    if not isinstance(app, dict):
        raise ConfigError(
            f"{path}: no [tool.flwr.app.config] section: is this a FlowerTune challenge's pyproject.toml?"
        )
    config = flatten(app)
    static = {k.removeprefix("static."): v for k, v in config.items() if k.startswith("static.")}
    config = {k: v for k, v in config.items() if not k.startswith("static.")}
    dataset = static.get("dataset.name")
    challenge = challenge_of(dataset) if isinstance(dataset, str) else None
    if challenge is None:
        known = "; ".join(f"{c.name}: {c.datasets[0]}" for c in CHALLENGES)
        raise ConfigError(
            f"{path}: [tool.flwr.app.config.static] dataset.name = {dataset!r} is none of the FlowerTune challenges' "
            f"datasets ({known}). The leaderboard fixes the static section: restore it as `flwr new` wrote it"
        )
    federations = data.get("tool", {}).get("flwr", {}).get("federations", {})
    default = federations.get("default", "local-simulation")
    nodes = flatten(federations.get(default, {})).get("options.num-supernodes")
    if not isinstance(nodes, int) or isinstance(nodes, bool) or nodes < 1:
        raise ConfigError(
            f"{path}: [tool.flwr.federations.{default}] options.num-supernodes = {nodes!r}: the challenge's client "
            f"count ({challenge.supernodes} for {challenge.name}) is needed"
        )
    name = data.get("project", {}).get("name") or path.parent.name
    return Project(path, str(name), challenge, config, static, nodes)


def lora_targets(model_type: str | None) -> list[str] | None:
    """peft's default LoRA modules for a model type (what FlowerTune's LoraConfig gets), or None if unknown."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    found = DEFAULTS.get(model_type or "")
    return list(found) if found else None


def experiment_config(
    project: Project,
    dataset: str | None,
    model: str | None,
    model_type: str | None,
    output_dir: str,
    overrides: list[str] | None = None,
    evaluations: dict[str, str] | None = None,
    eval_tokens: int | None = None,
) -> ExperimentConfig:
    """The fedtune config that runs ``project``: ``dataset`` a local copy of its static dataset (default: the
    hub id), ``model`` another base than its model.name (reported as not leaderboard-valid), ``evaluations``
    leaderboard column -> a local copy of its benchmark set, scored at the start and the end."""
    for item in overrides or []:
        key = item.split("=", 1)[0].strip()
        if any(key == f.rstrip(".") or key.startswith(f) for f in FIXED):
            raise ConfigError(
                f"override {item!r}: {key} is fixed by the challenge's static section (the leaderboard does not "
                "allow changing the dataset or the clients); give a local copy of the dataset with --dataset"
            )
    p, clients = project, project.supernodes
    fraction = p.config.get("strategy.fraction-fit", p.config.get("strategy.fraction-train", 1.0))
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ConfigError(f"{p.path}: strategy.fraction-fit = {fraction!r} must be a number in (0, 1]")
    per_round = min(clients, max(2, int(clients * fraction)))  # Flower's FedAvg: int(n * f), min_fit_clients 2
    source = dataset or p.static["dataset.name"]
    raw: dict[str, Any] = {
        "seed": 0,
        "model": {"name": model or p.value("model.name")},
        "adapter": {
            "method": "lora",
            "r": p.value("model.lora.peft-lora-r"),
            "alpha": p.value("model.lora.peft-lora-alpha"),
            "dropout": LORA_DROPOUT,
        },
        "data": {
            "dataset": source,
            "eval_dataset": source,  # a training-loss curve on the first examples: FlowerTune keeps no held-out share
            "recipe": p.challenge.recipe,
            "template": "flowertune",
            "max_seq_len": p.value("train.seq-length"),
        },
        "partition": {"method": "iid", "num_clients": clients},
        "federation": {"rounds": p.value("num-server-rounds"), "clients_per_round": per_round},
        "training": {
            "local_steps": p.value("train.training-arguments.max-steps"),
            "batch_size": p.value("train.training-arguments.per-device-train-batch-size"),
            "grad_accum": int(p.config.get("train.training-arguments.gradient-accumulation-steps", 1)),
            "lr": p.value("train.learning-rate-max"),
            "lr_min": p.value("train.learning-rate-min"),
            "lr_schedule": "cosine",
            "schedule_scope": "by_round",
            "gradient_checkpointing": bool(p.config.get("model.gradient-checkpointing", False)),
        },
        "evaluation": {"max_samples": 100, "exact_match": False},
        "output": {"dir": output_dir, "name": p.name, "save_adapter_every": _save_every(p)},
    }
    raw["evaluation"]["tasks"] = evaluation_tasks(project, evaluations or {}, eval_tokens)
    targets = lora_targets(model_type)
    if targets is not None:
        raw["adapter"]["target_modules"] = targets
    for item in overrides or []:
        apply_override(raw, item)
    return validate_config(raw, str(p.path))


def _save_every(p: Project) -> int | None:
    """``train.save-every-round``: FlowerTune's server saves the global adapter every N rounds and after the last."""
    n = p.config.get("train.save-every-round")
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"{p.path}: train.save-every-round = {n!r} must be a whole number of rounds, 1 or more")
    return n


def evaluation_tasks(
    project: Project, evaluations: dict[str, str], max_new_tokens: int | None = None
) -> list[dict[str, Any]]:
    """``evaluation.tasks`` scoring the leaderboard columns as FlowerTune's evaluation does: ``evaluations``
    maps a column's task (fpb, mmlu, pubmedqa, humaneval, ...) to a local copy of its set;
    ``max_new_tokens``: the most generated per answer, default the kind's."""
    known = {c.task: c for c in project.challenge.evaluations}
    tasks = []
    for name, path in evaluations.items():
        column = known.get(name.lower())
        if column is None:
            offered = ", ".join(sorted(known)) or "none yet"
            raise ConfigError(
                f"--eval {name}={path}: fedtune scores the {project.challenge.name} challenge's columns as FlowerTune "
                f"does from these sets: {offered}"
            )
        task = {"kind": column.kind, "dataset": path, "recipe": column.recipe, "name": column.task}
        if column.benchmark is not None:
            task["benchmark"] = column.benchmark
        if max_new_tokens is not None and "max_new_tokens" in EVAL_KINDS.entry(column.kind).info["options"]:
            task["max_new_tokens"] = max_new_tokens
        tasks.append(task)
    return tasks


def deviations(project: Project, cfg: ExperimentConfig, model_type: str | None, local_copy: bool) -> list[str]:
    """Why a run of ``cfg`` is not a leaderboard entry, each a sentence (none: it could be)."""
    p, out = project, []
    if p.config.get("model.quantization") in (4, 8) and cfg.model.dtype == "float32":
        out.append(
            f"the base is float32; the challenge quantizes it to {p.config['model.quantization']}-bit "
            "(bitsandbytes needs a CUDA GPU)"
        )
    if cfg.model.name != p.config.get("model.name"):
        out.append(f"the base is {cfg.model.name}, not the project's model.name {p.config.get('model.name')!r}")
    if p.supernodes != p.challenge.supernodes:
        out.append(f"num-supernodes is {p.supernodes}; the leaderboard fixes {p.challenge.supernodes}")
    if cfg.federation.rounds != p.config.get("num-server-rounds"):
        out.append(f"{cfg.federation.rounds} rounds, not the project's {p.config.get('num-server-rounds')}")
    if lora_targets(model_type) is None:
        out.append(f"peft has no default LoRA modules for model type {model_type!r}: fedtune's were used")
    if local_copy:
        out.append("the dataset is a local copy, which fedtune cannot check against the hub's")
    return out
