"""MMLU as FlowerTune's general-NLP evaluation scores it: its prompt, one generated answer, its parsing.

Each question is written as FlowerTune's ``infer_mmlu`` writes it: "Answer the following multiple choice
question.\nQuestion: {question}{?}\n\nOptions:\nA. ...\nThe answer is:\n" inside
"<|im_start|>question\n...<|im_end|>\n<|im_start|>answer\n", tokenised with the tokenizer's special
tokens; the model generates greedily as many tokens as the answer letter takes (one), and the answer
is read FlowerTune's way (``format_answer``: the text lowercased, non-alphanumerics to spaces, its
first character, counted only if it is a letter a-e). The leaderboard's columns are the accuracy over
all questions of each category (``CATEGORIES``, FlowerTune's ``MMLU_CATEGORY``): ``{name}_accuracy_by_group``
holds them, keyed stem, social_sciences, humanities, other.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from fedtune.data.items import LETTERS, ChoiceItem
from fedtune.data.tokenize import Encoder
from fedtune.evaluation.metrics import accuracy_report
from fedtune.evaluation.scoring import score

INSTRUCTION = "Answer the following multiple choice question."
CATEGORIES = {
    "stem": (
        "abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science "
        "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
        "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
        "high_school_mathematics high_school_physics high_school_statistics machine_learning"
    ).split(),
    "social_sciences": (
        "econometrics high_school_geography high_school_government_and_politics high_school_macroeconomics "
        "high_school_microeconomics high_school_psychology human_sexuality professional_psychology "
        "public_relations security_studies sociology us_foreign_policy"
    ).split(),
    "humanities": (
        "formal_logic high_school_european_history high_school_us_history high_school_world_history "
        "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy "
        "prehistory professional_law world_religions"
    ).split(),
    "other": (
        "business_ethics clinical_knowledge college_medicine global_facts human_aging management marketing "
        "medical_genetics miscellaneous nutrition professional_accounting professional_medicine virology"
    ).split(),
}
CATEGORY_OF = {subject: category for category, subjects in CATEGORIES.items() for subject in subjects}


def flowertune_prompt(item: ChoiceItem) -> str:
    question = item.question
    if not question.endswith("?") and not question.endswith("."):
        question += "?"
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(item.choices))
    body = f"{INSTRUCTION}\nQuestion: {question}\n\nOptions:\n{options}\nThe answer is:\n"
    return f"<|im_start|>question\n{body}<|im_end|>\n<|im_start|>answer\n"


def flowertune_answer(output: str) -> str | None:
    """FlowerTune's ``format_answer`` for multiple choice: the letter a-e its text starts with, else None."""
    text = output.lower()
    if "\n##" in text:
        text = text.split("\n##")[1].split("\n")[0].strip().lower()
    text = re.sub(" +", " ", re.sub(r"[^a-zA-Z0-9]", " ", text).strip())
    text = text.encode("ascii", "ignore").decode("ascii")
    first = text[:1]
    return first if first in ("a", "b", "c", "d", "e") else None


class FlowerTuneMmlu:
    def __init__(self, name: str, items: Sequence[ChoiceItem], encoder: Encoder, max_new_tokens: int | None = None):
        self.name, self.items, self.tokenizer = name, list(items), encoder.tokenizer
        self.prompts = [self.tokenizer(flowertune_prompt(it))["input_ids"] for it in self.items]
        letter = self.tokenizer("A", add_special_tokens=False)["input_ids"]
        self.max_new_tokens = max_new_tokens or len(letter)  # FlowerTune: as many tokens as the gold letter

    def run(self, model: torch.nn.Module, batch_size: int) -> dict[str, Any]:
        s = score(model, self.tokenizer, self.prompts, batch_size=batch_size, max_new_tokens=self.max_new_tokens)
        picked = [flowertune_answer(g) for g in s.generations]
        hits = [p == LETTERS[it.answer].lower() for p, it in zip(picked, self.items, strict=True)]
        groups = [CATEGORY_OF.get(it.group or "", "other") for it in self.items]
        return accuracy_report(self.name, hits, groups)
