"""The four FlowerTune LLM leaderboard challenges: their static datasets, client counts and columns.

A challenge is known by its static dataset (``[tool.flwr.app.config.static] dataset.name``), under the
hub names FlowerTune has published it as. The leaderboard fixes that dataset and the number of
SuperNodes; ``COMMUNICATION_BUDGET_MB`` is its cap on the bytes sent both ways over a run.
"""

from __future__ import annotations

from dataclasses import dataclass

COMMUNICATION_BUDGET_MB = 200_000  # the leaderboard's cap, up and down together, MB = 10^6 bytes


@dataclass(frozen=True)
class Column:
    """A leaderboard column fedtune scores as FlowerTune does: task ``task`` (``--eval TASK=PATH``, read
    through ``recipe``, scored by ``kind`` as ``benchmark``); the value is ``{task}_{metric}``, or with
    ``group`` that group's entry of ``{task}_{metric}_by_group``."""

    name: str
    task: str
    recipe: str
    kind: str
    group: str | None = None
    metric: str = "accuracy"
    benchmark: str | None = None


@dataclass(frozen=True)
class Challenge:
    name: str
    datasets: tuple[str, ...]  # hub ids its static dataset.name may be
    recipe: str  # the dataset recipe with the challenge's preprocessing
    supernodes: int  # options.num-supernodes the leaderboard fixes
    columns: tuple[str, ...]  # the leaderboard's evaluation columns (averaged into "Average")
    evaluations: tuple[Column, ...] = ()  # the columns fedtune scores as FlowerTune does


CHALLENGES = (
    Challenge(
        "general_nlp",
        ("vicgalle/alpaca-gpt4", "flwrlabs/alpaca-gpt4"),
        "flowertune_general_nlp",
        20,
        ("STEM", "SocialSciences", "Humanities"),
        tuple(
            Column(name, "mmlu", "mmlu", "flowertune_mmlu", group)
            for name, group in (("STEM", "stem"), ("SocialSciences", "social_sciences"), ("Humanities", "humanities"))
        ),
    ),
    Challenge(
        "finance",
        ("FinGPT/fingpt-sentiment-train", "flwrlabs/fingpt-sentiment-train"),
        "flowertune_finance",
        50,
        ("FPB", "FIQA", "TFNS"),
        tuple(Column(name, name.lower(), name.lower(), "sentiment_generation") for name in ("FPB", "FIQA", "TFNS")),
    ),
    Challenge(
        "medical",
        ("medalpaca/medical_meadow_medical_flashcards", "flwrlabs/medical-meadow-medical-flashcards"),
        "flowertune_medical",
        20,
        ("PubMedQA", "MedMCQA", "MedQA", "CareQA"),
        tuple(
            Column(name, name.lower(), name.lower(), "flowertune_medical")
            for name in ("PubMedQA", "MedMCQA", "MedQA", "CareQA")
        ),
    ),
    Challenge(
        "code",
        ("flwrlabs/code-alpaca-20k", "sahil2801/CodeAlpaca-20k"),
        "flowertune_code",
        10,
        ("MBPP", "HumanEval", "MultiPL-E (JS)", "MultiPL-E (C++)"),
        tuple(
            Column(name, task, recipe, "flowertune_code", metric="pass_at_1", benchmark=task)
            for name, task, recipe in (
                ("MBPP", "mbpp", "mbpp"),
                ("HumanEval", "humaneval", "humaneval"),
                ("MultiPL-E (JS)", "multiple_js", "multipl_e"),
                ("MultiPL-E (C++)", "multiple_cpp", "multipl_e"),
            )
        ),
    ),
)


def challenge_of(dataset: str) -> Challenge | None:
    """The challenge whose static dataset this is (hub ids compare case-insensitively), or None."""
    key = dataset.strip().lower()
    return next((c for c in CHALLENGES if key in (d.lower() for d in c.datasets)), None)
