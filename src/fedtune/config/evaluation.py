"""The ``evaluation`` section: held-out evaluation of the federation's model(s)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fedtune.config.base import Strict
from fedtune.core.registry import DATASET_RECIPES, EVAL_KINDS

EVAL_RECIPES = tuple(e.name for e in DATASET_RECIPES if "evaluation" in e.info.get("uses", ()))
KIND_OPTIONS = (
    "benchmark", "shots", "method", "max_new_tokens", "chain_of_thought", "samples", "k", "temperature", "timeout_s"
)  # fmt: skip


class EvalTaskConfig(Strict):
    """One benchmark evaluated on the global model: a kind of scoring over a set of items (docs/evaluation.md)."""

    kind: EVAL_KINDS.literal() = Field(description=EVAL_KINDS.describe())
    dataset: str = Field(description="a local file (.jsonl/.json/.parquet), saved HF dataset dir, or hub id")
    recipe: DATASET_RECIPES.literal() | None = Field(
        None,
        description="the public set whose columns the dataset comes in: "
        + ", ".join(EVAL_RECIPES)
        + "; default: the kind's own record shape (docs/evaluation.md)",
    )
    name: str | None = Field(
        None, pattern=r"^[a-z][a-z0-9_]*$", description="metric prefix ({name}_accuracy, ...); default: recipe or kind"
    )
    split: str = Field("test", description="the split of a hub id or saved DatasetDict")
    max_samples: int | None = Field(None, ge=1, description="the first N items only")
    on_error: Literal["raise", "skip"] = Field("raise", description="bad records: raise (all listed) or skip")
    every_round: bool = Field(
        False, description="also after every evaluated round (default: at the start, if evaluated, and the end)"
    )
    benchmark: str | None = Field(
        None,
        description="flowertune_medical (pubmedqa, medmcqa, medqa, careqa), flowertune_code (humaneval, mbpp, "
        "multiple_js, multiple_cpp): whose prompt, parsing and limits to use; default: the recipe where it names one",
    )
    shots: int = Field(0, ge=0, le=25, description="multiple_choice, answer_extraction: solved examples shown first")
    method: Literal["letter", "option"] = Field(
        "letter",
        description="multiple_choice: the answer letter's next-token log-prob, or each option's log-likelihood",
    )
    max_new_tokens: int | None = Field(
        None,
        ge=1,
        description="generated kinds: tokens per answer (default 256; flowertune_code: FlowerTune's, up to 1024 "
        "tokens with the prompt, 2048 for MBPP)",
    )
    chain_of_thought: bool = Field(False, description="answer_extraction: ask the model to think step by step")
    samples: int = Field(1, ge=1, le=200, description="pass_at_k: programs per problem (1: greedy)")
    k: list[int] = Field(default_factory=lambda: [1], description="pass_at_k: the k of each pass@k reported")
    temperature: float = Field(0.8, gt=0, description="pass_at_k with samples > 1: sampling temperature")
    timeout_s: float = Field(10.0, gt=0, le=600, description="pass_at_k: wall-clock limit per program")

    @model_validator(mode="after")
    def _fits_kind(self) -> EvalTaskConfig:
        entry = EVAL_KINDS.entry(self.kind)
        defaults = EvalTaskConfig.model_fields
        stray = [
            o
            for o in KIND_OPTIONS
            if o not in entry.info["options"]
            and o in self.model_fields_set
            and getattr(self, o) != defaults[o].get_default(call_default_factory=True)
        ]
        if stray:
            raise ValueError(
                f"{', '.join(stray)} do not apply to kind {self.kind!r} (its options: "
                f"{', '.join(entry.info['options']) or 'none'})"
            )
        if self.recipe is not None:
            recipe = DATASET_RECIPES.entry(self.recipe)
            if self.recipe not in EVAL_RECIPES:
                raise ValueError(
                    f"recipe {self.recipe!r} is a training set; evaluation recipes: {', '.join(EVAL_RECIPES)}"
                )
            shape = DATASET_RECIPES.load(self.recipe).shape
            if shape != entry.info["shape"]:
                raise ValueError(
                    f"recipe {recipe.name!r} gives {shape} items; kind {self.kind!r} scores {entry.info['shape']} items"
                )
        benchmarks = entry.info.get("benchmarks", ())
        if benchmarks and self.benchmark is None:
            if self.recipe not in benchmarks:  # e.g. multipl_e, which holds both languages
                raise ValueError(
                    f"kind {self.kind!r} needs benchmark: one of {', '.join(benchmarks)} (it defaults to the recipe "
                    f"when that is one of them; recipe is {self.recipe!r})"
                )
            self.benchmark = self.recipe
        elif self.benchmark is not None and self.benchmark not in benchmarks:
            raise ValueError(
                f"benchmark {self.benchmark!r}: kind {self.kind!r} scores "
                + (", ".join(benchmarks) if benchmarks else "no named benchmark")
            )
        bad_k = [k for k in self.k if not 1 <= k <= self.samples]
        if bad_k:
            raise ValueError(f"k={bad_k}: each k must be between 1 and samples={self.samples}")
        return self

    def metric_prefix(self) -> str:
        return self.name or self.recipe or self.kind


class EvaluationConfig(Strict):
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
    tasks: list[EvalTaskConfig] = Field(
        default_factory=list, description="benchmarks scored on the global model (docs/evaluation.md)"
    )

    @model_validator(mode="after")
    def _distinct_names(self) -> EvaluationConfig:
        names = [t.metric_prefix() for t in self.tasks]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"evaluation.tasks: two tasks report as {twice}; give each a distinct name")
        return self
