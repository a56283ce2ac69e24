"""Evaluation items: what a benchmark's row becomes, whatever its columns were.

  ChoiceItem  a question, its options and the index of the right one (MMLU, MedMCQA, PubMedQA, FPB)
  AnswerItem  a prompt and the reference a generation is scored against (GSM8K, Dolly, ROUGE-L sets)
  CodeItem    a programming task and the tests a candidate program must pass (HumanEval, MBPP, MultiPL-E)

Each has ``group`` (a subject, a category) for per-group scores, and a native record shape that
``item_from_record`` reads (docs/evaluation.md): a local file in that shape needs no recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

from fedtune.core.errors import DataError

LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class ChoiceItem:
    question: str
    choices: tuple[str, ...]
    answer: int  # index into choices
    group: str | None = None
    context: str = ""  # the passage the question is about (PubMedQA's abstract), if any

    @property
    def asked(self) -> str:
        """The question as a generic prompt shows it: its context, if any, then "Question: ..."."""
        return f"{self.context}\n\nQuestion: {self.question}" if self.context.strip() else self.question


@dataclass(frozen=True)
class AnswerItem:
    prompt: str
    reference: str
    group: str | None = None


@dataclass(frozen=True)
class CodeItem:
    prompt: str  # what the model is asked
    tests: str  # Python run after the candidate; the candidate passes when it exits 0
    code_prefix: str = ""  # code a completion continues (HumanEval's signature and docstring)
    entry_point: str | None = None  # the function the tests call
    group: str | None = None
    language: str = "python"  # python, js or cpp (MultiPL-E)
    completion: str = ""  # the text a base model continues (bigcode-evaluation-harness's prompt), if the set has one
    stop: tuple[str, ...] = ()  # where that continuation ends (MultiPL-E's stop_tokens); the kind adds its own


Item = ChoiceItem | AnswerItem | CodeItem
SHAPES = {
    "choice": "{question, choices: [str, ...], answer: index or letter, group?, context?}",
    "answer": "{prompt, reference, group?}",
    "code": "{prompt, tests, code_prefix?, entry_point?, group?}",
}


def text(record: dict[str, Any], key: str, where: str, *, empty: bool = False) -> str:
    """``record[key]`` as a string, or DataError naming where, the key and what it holds."""
    if key not in record:
        raise DataError(f"{where}: no field {key!r}; fields it has: {sorted(record)}")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}: {value!r:.60}")
    if not empty and not value.strip():
        raise DataError(f"{where}: {key!r} is empty")
    return value


def group_of(record: dict[str, Any], key: str | None) -> str | None:
    value = record.get(key) if key else None
    return None if value is None else str(value)


def choice_item(
    question: str, choices: Any, answer: Any, where: str, group: str | None = None, context: str = ""
) -> ChoiceItem:
    """A ChoiceItem after checking: 2-10 string options, the answer an index or a letter within them."""
    if not isinstance(choices, (list, tuple)) or not 2 <= len(choices) <= len(LETTERS):
        raise DataError(f"{where}: choices must be a list of 2 to {len(LETTERS)} strings, got {choices!r:.80}")
    if not all(isinstance(c, str) for c in choices):
        raise DataError(f"{where}: every choice must be a string, got {choices!r:.80}")
    if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in LETTERS:
        answer = LETTERS.index(answer.strip().upper())
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise DataError(
            f"{where}: answer must be an index 0..{len(choices) - 1} or a letter A..{LETTERS[len(choices) - 1]}, "
            f"got {answer!r:.40}"
        )
    return ChoiceItem(question, tuple(choices), answer, group, context)


def item_from_record(shape: str, record: Any, where: str) -> Item:
    """One record of the native shape ``shape`` ("choice", "answer" or "code") as an item."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: record is a {type(record).__name__}, expected {SHAPES[shape]}")
    if shape == "choice":
        if "choices" not in record or "answer" not in record:
            raise DataError(f"{where}: expected {SHAPES[shape]}; this record has keys {sorted(record)}")
        q = text(record, "question", where)
        context = text(record, "context", where, empty=True) if record.get("context") is not None else ""
        return choice_item(q, record["choices"], record["answer"], where, group_of(record, "group"), context)
    if shape == "answer":
        return AnswerItem(text(record, "prompt", where), text(record, "reference", where), group_of(record, "group"))
    prefix = text(record, "code_prefix", where, empty=True) if "code_prefix" in record else ""
    entry = text(record, "entry_point", where) if record.get("entry_point") is not None else None
    prompt, tests = text(record, "prompt", where), text(record, "tests", where)
    return CodeItem(prompt, tests, prefix, entry, group_of(record, "group"))


def load_items(
    path: str, recipe: Any = None, shape: str | None = None, on_error: str = "raise", split: str = "test"
) -> list[Item]:
    """The items of a local file / saved dataset / hub id (its ``split``): read through ``recipe``
    (``data.recipes.Recipe``), or, without one, as records of the native ``shape``."""
    from fedtune.data.formats import collect, read_rows

    if recipe is not None:
        if recipe.item is None:
            raise DataError(f"dataset recipe {recipe.name!r} gives training examples, not evaluation items")
        convert = recipe.item
    elif shape in SHAPES:
        convert = partial(item_from_record, shape)
    else:
        raise DataError(f"{path}: no recipe and no item shape (one of {', '.join(SHAPES)}) to read it with")
    return collect(read_rows(path, split=split), convert, str(path), on_error)
