"""Answer normalisation and exact-match scoring."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence


def normalize_answer(text: str) -> str:
    """Strip surrounding whitespace and one trailing period; case and inner spacing count."""
    text = text.strip()
    return text[:-1].rstrip() if text.endswith(".") else text


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


def could_still_match(partial: str, reference: str) -> bool:
    """Whether some continuation of ``partial`` (generation so far) is an exact match of ``reference``;
    never False for a prefix of a matching text (tested), so generation may stop a row it rejects."""
    if "\ufffd" in partial:  # a character cut between tokens: undecided
        return True
    text, target = partial.lstrip(), normalize_answer(reference)
    if target.startswith(text):
        return True
    return text.startswith(target) and re.fullmatch(r"\s*\.?\s*", text[len(target) :]) is not None


def grouped_accuracy(hits: Sequence[bool], groups: Sequence[str | None]) -> dict[str, float]:
    """Accuracy per group value (e.g. per task), for groups that are not None."""
    tally: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for hit, group in zip(hits, groups, strict=True):
        if group is not None:
            tally[group][0] += int(hit)
            tally[group][1] += 1
    return {g: h / n for g, (h, n) in sorted(tally.items())}
