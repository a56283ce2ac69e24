"""Question answering as FlowerTune's general-NLP and medical evaluations score it.

Each question is written as FlowerTune's ``infer_*`` functions write it: "{instruction}\n" then, for
multiple choice, "Question: {question}{?}\n\nOptions:\nA. ...", for PubMedQA "{context}\n{question}",
then "\nThe answer is:\n", all inside "<|im_start|>question\n...<|im_end|>\n<|im_start|>answer\n" and
tokenised with the tokenizer's special tokens. The model generates greedily as many tokens as the gold
answer of the first question of FlowerTune's batch of 16 takes (one for a letter), and the answer is read
by FlowerTune's ``format_answer``: the lowercased text, non-alphanumerics to spaces; for multiple choice
its first character, for yes/no the cleaned text; counted when that is one of a-e / yes / no, else the
whole lowercased text is compared with the gold. Instructions are FlowerTune's (the medical ones from
Meditron's evaluation). General NLP reports MMLU per category (``CATEGORIES``, FlowerTune's
``MMLU_CATEGORY``) in ``{name}_accuracy_by_group``: stem, social_sciences, humanities, other.
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

FLOWERTUNE_BATCH = 16  # FlowerTune's --batch-size: each batch generates as many tokens as its first gold
_DOCTOR = (
    "You are a medical doctor answering realworld medical entrance exam questions. Based on your "
    "understanding of basic and clinical science, medical knowledge, and mechanisms underlying health, "
    "disease, patient care, and modes of therapy, answer the following multiple-choice question. Select one "
    "correct answer from A to D. Base your answer on the current and standard practices referenced in "
    "medical guidelines."
)
INSTRUCTIONS = {
    "mmlu": "Answer the following multiple choice question.",
    "pubmedqa": "As an expert doctor in clinical science and medical knowledge, can you tell me if the following "
    "statement is correct? Answer yes, no, or maybe.",
    "medqa": "You are a medical doctor taking the US Medical Licensing Examination. You need to demonstrate your "
    "understanding of basic and clinical science, medical knowledge, and mechanisms underlying health, disease, "
    "patient care, and modes of therapy. Show your ability to apply the knowledge essential for medical practice. "
    "For the following multiple-choice question, select one correct answer from A to E. Base your answer on the "
    "current and standard practices referenced in medical guidelines.",
    "medmcqa": _DOCTOR,
    "careqa": _DOCTOR,
}
BOOLEAN = ("pubmedqa",)  # answered yes/no/maybe; the others by letter
MEDICAL = ("pubmedqa", "medmcqa", "medqa", "careqa")
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


def flowertune_prompt(item: ChoiceItem, benchmark: str = "mmlu") -> str:
    """The text FlowerTune's evaluation asks ``item`` with."""
    if benchmark in BOOLEAN:
        body = f"{item.context}\n{item.question}"
    else:
        question = item.question
        if not question.endswith("?") and not question.endswith("."):
            question += "?"
        options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(item.choices))
        body = f"Question: {question}\n\nOptions:\n{options}"
    ask = f"{INSTRUCTIONS[benchmark]}\n{body}\nThe answer is:\n"
    return f"<|im_start|>question\n{ask}<|im_end|>\n<|im_start|>answer\n"


def gold(item: ChoiceItem, benchmark: str = "mmlu") -> str:
    """The answer as FlowerTune's data holds it: yes/no/maybe, or the option's letter."""
    return item.choices[item.answer] if benchmark in BOOLEAN else LETTERS[item.answer]


def flowertune_answer(output: str, boolean: bool = False) -> str:
    """FlowerTune's ``format_answer`` on a generated text: what it compares with the lowercased gold."""
    full = output.lower()
    text = full
    if "\n##" in text:
        text = text.split("\n##")[1].split("\n")[0].strip().lower()
    # ASCII letters, digits and spaces from here, so FlowerTune's clean_answer (dropping non-ASCII) is a no-op
    text = re.sub(" +", " ", re.sub(r"[^a-zA-Z0-9]", " ", text).strip())
    if boolean:
        for doubled, single in (("yesyes", "yes"), ("nono", "no"), ("yesno", "yes"), ("noyes", "no")):
            if doubled in text:
                text = text.replace(doubled, single)
                break
    else:
        text = text[:1]
    return text if text in ("a", "b", "c", "d", "e", "yes", "no") else full


class FlowerTuneQa:
    """``benchmark``'s questions asked and read FlowerTune's way; accuracy, per ``group_of`` an item."""

    def __init__(self, name: str, items: Sequence[ChoiceItem], encoder: Encoder, benchmark: str = "mmlu"):
        self.name, self.items, self.tokenizer, self.benchmark = name, list(items), encoder.tokenizer, benchmark
        self.prompts = [self.tokenizer(flowertune_prompt(it, benchmark))["input_ids"] for it in self.items]
        self.golds = [gold(it, benchmark) for it in self.items]
        lengths = [len(self.tokenizer(g, add_special_tokens=False)["input_ids"]) for g in self.golds]
        self.budgets = [max(1, lengths[i - i % FLOWERTUNE_BATCH]) for i in range(len(self.items))]

    def group_of(self, item: ChoiceItem) -> str | None:
        return item.group

    def run(self, model: torch.nn.Module, batch_size: int) -> dict[str, Any]:
        outputs = [""] * len(self.items)
        for budget in sorted(set(self.budgets)):
            rows = [i for i, b in enumerate(self.budgets) if b == budget]
            prompts = [self.prompts[i] for i in rows]
            s = score(model, self.tokenizer, prompts, batch_size=batch_size, max_new_tokens=budget)
            for i, g in zip(rows, s.generations, strict=True):
                outputs[i] = g
        boolean = self.benchmark in BOOLEAN
        hits = [flowertune_answer(o, boolean) == g.lower() for o, g in zip(outputs, self.golds, strict=True)]
        return accuracy_report(self.name, hits, [self.group_of(it) for it in self.items])


class FlowerTuneMmlu(FlowerTuneQa):
    """MMLU as FlowerTune's general-NLP evaluation scores it, per MMLU category."""

    def __init__(self, name: str, items: Sequence[ChoiceItem], encoder: Encoder):
        super().__init__(name, items, encoder, "mmlu")

    def group_of(self, item: ChoiceItem) -> str | None:
        return CATEGORY_OF.get(item.group or "", "other")


class FlowerTuneMedical(FlowerTuneQa):
    """PubMedQA, MedMCQA, MedQA or CareQA as FlowerTune's medical evaluation scores them."""

    def __init__(self, name: str, items: Sequence[ChoiceItem], encoder: Encoder, benchmark: str | None = None):
        if benchmark not in MEDICAL:
            raise ValueError(f"flowertune_medical: benchmark must be one of {', '.join(MEDICAL)}, got {benchmark!r}")
        super().__init__(name, items, encoder, benchmark)
