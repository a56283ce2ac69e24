"""Financial sentiment as FinGPT's benchmarks and FlowerTune's finance evaluation score it.

The prompt is FinGPT's ("Instruction: What is the sentiment of this news? Please choose an answer from
{negative/neutral/positive}.\nInput: {text}\nAnswer: "; "tweet" for TFNS and FiQA's posts), as raw text
without the run's template; the model generates greedily, and the label is read FinGPT's way
(``change_target``): "positive" if the text contains positive or Positive, else "negative" if it
contains negative or Negative, else "neutral". Generation stops once positive appears (the label can
no longer change). Accuracy (FlowerTune's column) and macro-F1 over the three labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fedtune.core.errors import ConfigError
from fedtune.data.items import ChoiceItem
from fedtune.data.recipes import SENTIMENTS
from fedtune.data.tokenize import Encoder
from fedtune.evaluation.metrics import accuracy_report, macro_f1
from fedtune.evaluation.scoring import score

ASK = "What is the sentiment of this {medium}? Please choose an answer from {{negative/neutral/positive}}."


def fingpt_label(text: str) -> str:
    """FinGPT's ``change_target``: positive wins over negative, and neither is neutral."""
    if "positive" in text or "Positive" in text:
        return "positive"
    if "negative" in text or "Negative" in text:
        return "negative"
    return "neutral"


def fingpt_prompt(item: ChoiceItem) -> str:
    return f"Instruction: {ASK.format(medium=item.group or 'news')}\nInput: {item.question}\nAnswer: "


class SentimentGeneration:
    def __init__(self, name: str, items: Sequence[ChoiceItem], encoder: Encoder, max_new_tokens: int = 256):
        odd = [it for it in items if tuple(it.choices) != SENTIMENTS]
        if odd:
            raise ConfigError(
                f"evaluation.tasks ({name}): sentiment_generation scores the labels {'/'.join(SENTIMENTS)}; an item "
                f"has {odd[0].choices} (use label_choice for other labels)"
            )
        self.name, self.items, self.tokenizer, self.max_new_tokens = (
            name,
            list(items),
            encoder.tokenizer,
            max_new_tokens,
        )
        self.prompts = [self.tokenizer(fingpt_prompt(it))["input_ids"] for it in self.items]

    def run(self, model: torch.nn.Module, batch_size: int) -> dict[str, Any]:
        s = score(
            model,
            self.tokenizer,
            self.prompts,
            batch_size=batch_size,
            max_new_tokens=self.max_new_tokens,
            give_up=lambda i, text: fingpt_label(text) == "positive",  # settled: nothing after it changes the label
        )
        predicted = [fingpt_label(g) for g in s.generations]
        truth = [it.choices[it.answer] for it in self.items]
        hits = [p == t for p, t in zip(predicted, truth, strict=True)]
        out = accuracy_report(self.name, hits, [it.group for it in self.items])
        out[f"{self.name}_macro_f1"] = macro_f1(predicted, truth)
        return out
