"""Choosing among given answers: multiple choice (MMLU style) and label choice (classification).

Multiple choice writes each question as MMLU's evaluation does (``prompting.mmlu_block``: a header
naming the subject, ``shots`` solved questions of the same subject, lettered options, "Answer:") and
picks either the letter whose token is likeliest next (``method: letter``: argmax_c log p(" c" | prompt)
over the item's letters) or the option whose text is likeliest as the continuation
(``method: option``: argmax_c Σ_t log p(option_c,t | prompt, option_c,<t)). Accuracy is reported over
all items, per group (subject) and as the mean over groups.

Label choice asks through the run's own template, naming the labels, and picks the label whose text
(and the end of the answer) is likeliest as the reply; accuracy and macro-F1 over the labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fedtune.core.errors import ConfigError
from fedtune.data.items import LETTERS, ChoiceItem
from fedtune.data.tokenize import Encoder
from fedtune.evaluation.metrics import accuracy_report, macro_f1
from fedtune.evaluation.prompting import chat_prompt, mmlu_block, mmlu_header, shots_for
from fedtune.evaluation.scoring import score


class MultipleChoice:
    def __init__(
        self, name: str, items: Sequence[ChoiceItem], encoder: Encoder, shots: int = 0, method: str = "letter"
    ):
        self.name, self.items, self.method = name, list(items), method
        self.tokenizer = tok = encoder.tokenizer
        texts = []
        for i, item in enumerate(self.items):
            solved = "".join(mmlu_block(s, True) for s in shots_for(self.items, i, shots))
            texts.append(mmlu_header(item.group) + solved + mmlu_block(item, False))
        self.prompts = [tok(t)["input_ids"] for t in texts]
        widest = max(len(it.choices) for it in self.items)
        if method == "letter":
            lead, self.letters = letter_tokens(tok, widest, name)
            self.prompts = [p + lead for p in self.prompts]
        else:
            self.options = [
                [tok(f" {c.strip()}", add_special_tokens=False)["input_ids"] for c in it.choices] for it in self.items
            ]

    def run(self, model: torch.nn.Module, batch_size: int) -> dict[str, Any]:
        if self.method == "letter":
            s = score(model, self.tokenizer, self.prompts, batch_size=batch_size, candidates=self.letters)
            picks = [
                max(range(len(it.choices)), key=lambda c, lp=lp: lp[c])
                for it, lp in zip(self.items, s.choices, strict=True)
            ]
        else:
            prompts = [p for p, opts in zip(self.prompts, self.options, strict=True) for _ in opts]
            conts = [o for opts in self.options for o in opts]
            s = score(model, self.tokenizer, prompts, conts, batch_size=batch_size)
            picks, at = [], 0
            for opts in self.options:
                lls = s.log_likelihood[at : at + len(opts)]
                picks.append(max(range(len(opts)), key=lls.__getitem__))
                at += len(opts)
        hits = [p == it.answer for p, it in zip(picks, self.items, strict=True)]
        return accuracy_report(self.name, hits, [it.group for it in self.items])


def letter_tokens(tokenizer: Any, n: int, name: str) -> tuple[list[int], list[int]]:
    """(tokens every " A".." X" starts with, the one token after them that tells each letter apart).

    Where " A" is one token the first part is empty. Where it is a space token then "A", the space is
    appended to every prompt: log p(" A") = log p(space) + log p(A | space), and the first term is the
    same for every letter, so the argmax over letters is unchanged.
    """
    ids = [tokenizer(f" {letter}", add_special_tokens=False)["input_ids"] for letter in LETTERS[:n]]
    lead = ids[0][:-1]
    if any(x[:-1] != lead for x in ids) or len({x[-1] for x in ids}) != n:
        raise ConfigError(
            f"evaluation.tasks ({name}): this tokenizer writes ' A'..' {LETTERS[n - 1]}' in tokens that no single "
            "next token tells apart; use method: option"
        )
    return lead, [x[-1] for x in ids]


class LabelChoice:
    def __init__(self, name: str, items: Sequence[ChoiceItem], encoder: Encoder):
        self.name, self.items, self.tokenizer = name, list(items), encoder.tokenizer
        tok = encoder.tokenizer
        self.prompts, self.labels = [], []
        for item in self.items:
            ask = f"{item.asked.strip()}\nAnswer with one of: {', '.join(item.choices)}."
            self.prompts.append(chat_prompt(encoder, [], ask))
            self.labels.append(
                [[*tok(c, add_special_tokens=False)["input_ids"], tok.eos_token_id] for c in item.choices]
            )

    def run(self, model: torch.nn.Module, batch_size: int) -> dict[str, Any]:
        prompts = [p for p, labels in zip(self.prompts, self.labels, strict=True) for _ in labels]
        conts = [c for labels in self.labels for c in labels]
        s = score(model, self.tokenizer, prompts, conts, batch_size=batch_size)
        picks, at = [], 0
        for labels in self.labels:
            picks.append(max(range(len(labels)), key=lambda c, at=at: s.log_likelihood[at + c]))
            at += len(labels)
        hits = [p == it.answer for p, it in zip(picks, self.items, strict=True)]
        out = accuracy_report(self.name, hits, [it.group for it in self.items])
        truth = [it.choices[it.answer] for it in self.items]
        out[f"{self.name}_macro_f1"] = macro_f1([it.choices[p] for p, it in zip(picks, self.items, strict=True)], truth)
        return out
