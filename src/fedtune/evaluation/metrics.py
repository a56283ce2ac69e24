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
    return grouped_mean([float(h) for h in hits], groups)


def grouped_mean(values: Sequence[float], groups: Sequence[str | None]) -> dict[str, float]:
    """Mean of the values per group value, for groups that are not None."""
    tally: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for value, group in zip(values, groups, strict=True):
        if group is not None:
            tally[group][0] += value
            tally[group][1] += 1
    return {g: total / n for g, (total, n) in sorted(tally.items())}


def accuracy_report(name: str, hits: Sequence[bool], groups: Sequence[str | None]) -> dict:
    """``{name}_accuracy`` over all items; with groups, ``{name}_accuracy_by_group`` and their unweighted mean
    ``{name}_accuracy_macro`` (MMLU's average over subjects)."""
    out: dict = {f"{name}_accuracy": sum(hits) / max(1, len(hits))}
    by_group = grouped_accuracy(hits, groups)
    if by_group:
        out[f"{name}_accuracy_by_group"] = by_group
        out[f"{name}_accuracy_macro"] = sum(by_group.values()) / len(by_group)
    return out


def macro_f1(predicted: Sequence[str], truth: Sequence[str]) -> float:
    """Mean over the true labels of F1 = 2·TP / (2·TP + FP + FN)."""
    scores = []
    for label in sorted(set(truth)):
        tp = sum(p == label and t == label for p, t in zip(predicted, truth, strict=True))
        fp = sum(p == label and t != label for p, t in zip(predicted, truth, strict=True))
        fn = sum(p != label and t == label for p, t in zip(predicted, truth, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / max(1, len(scores))
