"""The benchmarks of ``evaluation.tasks``: built once from the config, scored on the global model when due.

Each task reads its items (``data.items.load_items``: through a recipe, or the kind's own record shape),
builds its prompts with the run's encoder, and reports metrics prefixed by its name. Tasks run at
round 0 (when the base model is evaluated), after the last round, and after every evaluated round
where ``every_round`` says so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedtune.config.evaluation import EvalTaskConfig
from fedtune.core.errors import DataError
from fedtune.core.registry import DATASET_RECIPES, EVAL_KINDS
from fedtune.data.items import load_items
from fedtune.data.tokenize import Encoder

log = logging.getLogger(__name__)


@dataclass
class Task:
    cfg: EvalTaskConfig
    scorer: Any  # the kind's object: .run(model, batch_size) -> metrics

    @property
    def name(self) -> str:
        return self.cfg.metric_prefix()

    def due(self, r: int, last: int) -> bool:
        return r == 0 or r == last or self.cfg.every_round


def build_tasks(configs: Sequence[EvalTaskConfig], encoder: Encoder) -> list[Task]:
    tasks = []
    for i, cfg in enumerate(configs):
        entry = EVAL_KINDS.entry(cfg.kind)
        recipe = None if cfg.recipe is None else DATASET_RECIPES.load(cfg.recipe)
        try:
            items = load_items(cfg.dataset, recipe, entry.info["shape"], cfg.on_error, cfg.split)
        except DataError as exc:
            raise DataError(f"evaluation.tasks[{i}] ({cfg.metric_prefix()}): {exc}") from None
        items = items[: cfg.max_samples] if cfg.max_samples else items
        options = {o: getattr(cfg, o) for o in entry.info["options"] if getattr(cfg, o) is not None}
        scorer = EVAL_KINDS.load(cfg.kind)(cfg.metric_prefix(), items, encoder, **options)
        tasks.append(Task(cfg, scorer))
        log.info("evaluation task %s: %s on %d items of %s", cfg.metric_prefix(), cfg.kind, len(items), cfg.dataset)
    return tasks


def run_tasks(tasks: Sequence[Task], model: torch.nn.Module, batch_size: int, r: int, last: int) -> dict[str, Any]:
    """Metrics of the tasks due after round ``r`` (``last``: the run's final round), with each one's seconds."""
    out: dict[str, Any] = {}
    for task in tasks:
        if task.due(r, last):
            start = time.perf_counter()
            out |= task.scorer.run(model, batch_size)
            out[f"{task.name}_s"] = time.perf_counter() - start
    return out
