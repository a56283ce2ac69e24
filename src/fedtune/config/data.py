"""The ``data`` and ``partition`` sections: where examples come from, and how clients split them (docs/data.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fedtune.config.base import Strict
from fedtune.core.registry import DATASET_RECIPES

TRAINING_RECIPES = tuple(e.name for e in DATASET_RECIPES if "training" in e.info.get("uses", ()))


class BuiltinTasksConfig(Strict):
    """Size and mix of the generated built-in dataset (``data.dataset: builtin:tasks`` or ``builtin:preferences``)."""

    tasks: list[Literal["arithmetic", "unit_conversion", "string_transform", "max_of_list"]] = Field(
        default_factory=lambda: ["arithmetic", "unit_conversion", "string_transform", "max_of_list"],
        description="task families to generate (each example's task field names it)",
    )
    train_per_task: int = Field(400, ge=1, description="training examples per task")
    eval_per_task: int = Field(25, ge=1, description="held-out examples per task (never in training)")
    public_per_task: int = Field(
        100, ge=1, description="paradigm kd: public examples per task (never in training or evaluation)"
    )


class DataConfig(Strict):
    """Where examples come from and how they become token sequences."""

    dataset: str = Field(
        "builtin:tasks",
        description="builtin:tasks, builtin:preferences (the same problems as preference pairs: the right answer "
        "chosen, a near miss rejected), or a .jsonl/.json/.parquet file or saved HF dataset",
    )
    eval_dataset: str | None = Field(None, description="held-out file; default: split eval_fraction off dataset")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="held-out share of dataset when no eval_dataset")
    recipe: DATASET_RECIPES.literal() | None = Field(
        None,
        description="the public set whose columns dataset and eval_dataset come in (docs/data.md); default: "
        "fedtune's own instruction/chat records. "
        + "; ".join(f"{e.name}: {e.summary}" for e in DATASET_RECIPES if e.name in TRAINING_RECIPES),
    )
    on_error: Literal["raise", "skip"] = Field(
        "raise",
        description="bad records: raise (all of them listed in one error) or skip (counted, first reasons logged)",
    )
    public_dataset: str | None = Field(
        None, description="paradigm kd: the public set every party may see (a local file); default built-in"
    )
    template: Literal["auto", "chat", "alpaca", "flowertune"] = Field(
        "auto", description="auto: tokenizer's chat template if any; flowertune: FlowerTune's Alpaca-style prompt"
    )
    system_prompt: str | None = Field(None, description="system turn added to every prompt (train and eval)")
    max_seq_len: int = Field(256, ge=8, description="longer examples lose the start of the prompt")
    train_on_prompt: bool = Field(False, description="loss on prompt tokens too (default: response only)")
    builtin: BuiltinTasksConfig = Field(default_factory=BuiltinTasksConfig)
    split_seed: int | None = Field(
        None, description="seeds the held-out split and the partition across clients; default: the top-level seed"
    )

    @model_validator(mode="after")
    def _recipe_trains(self) -> DataConfig:
        if self.recipe is not None and self.recipe not in TRAINING_RECIPES:
            raise ValueError(
                f"data.recipe={self.recipe!r} is an evaluation set (use it in evaluation.tasks); training recipes: "
                f"{', '.join(TRAINING_RECIPES)}"
            )
        return self


class PartitionConfig(Strict):
    """How the training examples are split across clients (deterministic by seed)."""

    method: Literal["iid", "dirichlet", "by_field", "quantity_skew"] = Field("iid", description="see docs/data.md")
    num_clients: int = Field(4, ge=1, lt=2**31, description="number of clients in the federation")
    field: str | None = Field(None, description="record field for dirichlet/by_field (e.g. task)")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (dirichlet, quantity_skew)")
    min_examples: int = Field(1, ge=1, description="a client with fewer examples is an error")
    holdout_fraction: float = Field(0.0, ge=0, lt=1, description="per-client held-out share for per-client eval")

    @model_validator(mode="after")
    def _field_needed(self) -> PartitionConfig:
        if self.method in ("dirichlet", "by_field") and not self.field:
            raise ValueError(f"partition.field is required when partition.method={self.method!r} (e.g. task)")
        return self
