"""From config to data: load or generate examples, split off eval, partition across clients."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedtune.config import DataConfig, PartitionConfig
from fedtune.core import rng
from fedtune.core.errors import ConfigError, DataError
from fedtune.core.registry import DATASET_RECIPES
from fedtune.data import partitioners
from fedtune.data.builtin.preferences import generate_preferences
from fedtune.data.builtin.tasks import generate_public, generate_tasks
from fedtune.data.formats import Example, load_examples

BUILTIN = "builtin:tasks"
BUILTIN_PAIRS = "builtin:preferences"  # the same problems as preference pairs (data.builtin.preferences module)
GENERATED = {BUILTIN: generate_tasks, BUILTIN_PAIRS: generate_preferences}


@dataclass(frozen=True)
class FederatedData:
    train: list[Example]
    eval: list[Example]
    parts: list[np.ndarray]  # client id -> indices into train
    builtin: bool


def load_splits(cfg: DataConfig, seed: int) -> tuple[list[Example], list[Example], bool]:
    """(train, eval, is_builtin). Without eval_dataset, a seeded eval_fraction of the data is held out."""
    if cfg.dataset.startswith("builtin:"):
        if cfg.dataset not in GENERATED:
            raise DataError(f"data.dataset={cfg.dataset!r}: the built-in datasets are {', '.join(GENERATED)}")
        b = cfg.builtin
        train, evaluation = GENERATED[cfg.dataset](b.tasks, b.train_per_task, b.eval_per_task)
        return train, evaluation, True
    examples = load_data_file(cfg, cfg.dataset)
    if cfg.eval_dataset:
        return examples, load_data_file(cfg, cfg.eval_dataset), False
    order = rng.numpy_rng(rng.HELD_OUT, seed).permutation(len(examples))
    n_eval = max(1, round(cfg.eval_fraction * len(examples)))
    if n_eval >= len(examples):
        raise DataError(f"{cfg.dataset}: {len(examples)} examples are too few to hold out data.eval_fraction")
    eval_idx, train_idx = sorted(order[:n_eval]), sorted(order[n_eval:])
    return [examples[i] for i in train_idx], [examples[i] for i in eval_idx], False


def load_data_file(cfg: DataConfig, path: str) -> list[Example]:
    """The examples of one of the config's data files, read through ``data.recipe`` under ``data.on_error``."""
    recipe = None if cfg.recipe is None else DATASET_RECIPES.load(cfg.recipe)
    return load_examples(path, recipe, cfg.on_error)


def field_values(examples: list[Example], field: str, source: str) -> list[str]:
    values = []
    for i, ex in enumerate(examples):
        if field not in ex.meta or ex.meta[field] is None:
            raise DataError(
                f"{source}: record {i} has no field {field!r} (partition.field); fields it has: "
                f"{sorted(ex.meta) or 'none beyond the text'}"
            )
        values.append(str(ex.meta[field]))
    return values


def partition(train: list[Example], cfg: PartitionConfig, seed: int, source: str) -> list[np.ndarray]:
    n, k = len(train), cfg.num_clients
    if cfg.method == "iid":
        return partitioners.iid(n, k, seed, cfg.min_examples)
    if cfg.method == "quantity_skew":
        return partitioners.quantity_skew(n, k, cfg.alpha, seed, cfg.min_examples)
    labels = field_values(train, cfg.field or "", source)
    if cfg.method == "dirichlet":
        return partitioners.dirichlet(labels, k, cfg.alpha, seed, cfg.min_examples)
    return partitioners.by_field(labels, k, cfg.min_examples)


def prepare_federated_data(data: DataConfig, part: PartitionConfig, seed: int) -> FederatedData:
    train, evaluation, builtin = load_splits(data, seed)
    return FederatedData(train, evaluation, partition(train, part, seed, data.dataset), builtin)


def holdout_split(indices: np.ndarray, fraction: float, seed: int, client_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, holdout) of one client's indices; holdout empty when fraction is 0 or too few examples."""
    n_hold = round(fraction * len(indices))
    if n_hold == 0 or n_hold >= len(indices):
        return indices, indices[:0]
    order = rng.numpy_rng(rng.CLIENT_HOLDOUT, seed, client=client_id).permutation(len(indices))
    return np.sort(indices[order[n_hold:]]), np.sort(indices[order[:n_hold]])


def public_examples(d: DataConfig, who: str) -> tuple[list[Example], str]:
    """(examples, where they came from) of the public set every party may see: ``data.public_dataset``, or the
    built-in generator's (disjoint from training and evaluation). ``who``: what needs it, for the error."""
    if d.public_dataset:
        return load_data_file(d, d.public_dataset), d.public_dataset
    if d.dataset != BUILTIN:
        raise ConfigError(
            f"{who} needs a public set that every party may see: set data.public_dataset to a local file "
            f"(.jsonl/.json/.parquet or a saved HF dataset); data.dataset={d.dataset!r} has no built-in one"
        )
    b = d.builtin
    examples = generate_public(b.tasks, b.train_per_task, b.eval_per_task, b.public_per_task)
    return examples, f"built-in tasks ({b.public_per_task} per task, disjoint from training and evaluation)"
