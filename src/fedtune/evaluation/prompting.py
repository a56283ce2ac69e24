"""Prompts of the evaluation kinds: the run's own template (what training saw), or MMLU's raw text."""

from __future__ import annotations

from collections.abc import Sequence

from fedtune.data.formats import Example
from fedtune.data.items import LETTERS, ChoiceItem
from fedtune.data.tokenize import Encoder


def chat_prompt(encoder: Encoder, turns: Sequence[tuple[str, str]], question: str) -> list[int]:
    """Token ids of the run's template over solved (question, answer) turns and then ``question``."""
    messages = [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
    return encoder.encode_prompt(Example(tuple(messages)))


def mmlu_block(item: ChoiceItem, with_answer: bool) -> str:
    """One question as MMLU's evaluation writes it: the question, lettered options, "Answer:"."""
    options = "".join(f"{LETTERS[i]}. {c}\n" for i, c in enumerate(item.choices))
    answer = f" {LETTERS[item.answer]}\n\n" if with_answer else ""
    return f"{item.asked.strip()}\n{options}Answer:{answer}"


def mmlu_header(group: str | None) -> str:
    about = f" about {group.replace('_', ' ')}" if group else ""
    return f"The following are multiple choice questions (with answers){about}.\n\n"


def shots_for(items: Sequence, i: int, k: int, same_group: bool = True) -> list:
    """The first ``k`` items other than item ``i`` (of its group when ``same_group``), in file order."""
    group = items[i].group
    picked = [it for j, it in enumerate(items) if j != i and (not same_group or it.group == group)]
    return picked[:k]
