"""Scoring what the model writes: answer extraction (GSM8K) and ROUGE-L (Dolly, Natural Instructions).

Both ask through the run's own template. Answer extraction shows ``shots`` solved problems as earlier
turns, optionally asks for step-by-step reasoning, generates greedily, reads the final number
(``answers.final_number``) and counts it right when it equals the reference's by value. ROUGE-L is
the F1 of the longest common subsequence of words between the generation and the reference, as the
``rouge-score`` package computes it (with its Porter stemmer), averaged over items and per group.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fedtune.core.errors import ConfigError
from fedtune.data.items import AnswerItem
from fedtune.data.tokenize import Encoder
from fedtune.evaluation.answers import final_number, same_number
from fedtune.evaluation.metrics import accuracy_report, grouped_mean
from fedtune.evaluation.prompting import chat_prompt, shots_for
from fedtune.evaluation.scoring import score

STEP_BY_STEP = "\nLet's think step by step."


class AnswerExtraction:
    def __init__(
        self,
        name: str,
        items: Sequence[AnswerItem],
        encoder: Encoder,
        shots: int = 0,
        max_new_tokens: int = 256,
        chain_of_thought: bool = False,
    ):
        self.name, self.items, self.tokenizer, self.max_new_tokens = (
            name,
            list(items),
            encoder.tokenizer,
            max_new_tokens,
        )
        ask = (lambda q: q + STEP_BY_STEP) if chain_of_thought else (lambda q: q)
        self.prompts = [
            chat_prompt(
                encoder, [(ask(s.prompt), s.reference) for s in shots_for(self.items, i, shots, False)], ask(it.prompt)
            )
            for i, it in enumerate(self.items)
        ]
        self.gold = [final_number(it.reference) for it in self.items]

    def run(self, model: torch.nn.Module, batch_size: int) -> dict[str, Any]:
        s = score(model, self.tokenizer, self.prompts, batch_size=batch_size, max_new_tokens=self.max_new_tokens)
        hits = [same_number(final_number(g), gold) for g, gold in zip(s.generations, self.gold, strict=True)]
        return accuracy_report(self.name, hits, [it.group for it in self.items])


class RougeL:
    def __init__(self, name: str, items: Sequence[AnswerItem], encoder: Encoder, max_new_tokens: int = 256):
        try:
            from rouge_score import rouge_scorer
        except ImportError:
            raise ConfigError(
                f"evaluation.tasks ({name}): kind rouge_l needs the rouge-score package: pip install 'fedtune[eval]'"
            ) from None
        self.scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        self.name, self.items, self.tokenizer, self.max_new_tokens = (
            name,
            list(items),
            encoder.tokenizer,
            max_new_tokens,
        )
        self.prompts = [chat_prompt(encoder, [], it.prompt) for it in self.items]

    def run(self, model: torch.nn.Module, batch_size: int) -> dict[str, Any]:
        s = score(model, self.tokenizer, self.prompts, batch_size=batch_size, max_new_tokens=self.max_new_tokens)
        f1 = [
            self.scorer.score(it.reference, g)["rougeL"].fmeasure
            for it, g in zip(self.items, s.generations, strict=True)
        ]
        out: dict[str, Any] = {f"{self.name}_rouge_l": sum(f1) / max(1, len(f1))}
        by_group = grouped_mean(f1, [it.group for it in self.items])
        if by_group:
            out[f"{self.name}_rouge_l_by_group"] = by_group
        return out
