"""Held-out evaluation: token-mean loss and perplexity; exact-match accuracy by greedy generation."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from fedtune.data.formats import Example
from fedtune.data.tokenize import Encoded, Encoder, collate
from fedtune.evaluation.generation import greedy_generate
from fedtune.evaluation.metrics import exact_match, grouped_accuracy
from fedtune.losses import token_loss_sum


@dataclass(frozen=True)
class EvalSet:
    """Held-out examples, encoded once: sequences for loss, prompts for generation."""

    examples: list[Example]
    encoded: list[Encoded]
    prompts: list[list[int]]

    @classmethod
    def build(cls, examples: Sequence[Example], encoder: Encoder) -> EvalSet:
        encoded, _ = encoder.encode_all(examples)
        return cls(list(examples), encoded, [list(e.input_ids[: e.prompt_len]) for e in encoded])


@torch.no_grad()
def eval_loss(model: torch.nn.Module, encoded: Sequence[Encoded], pad_id: int, batch_size: int) -> float:
    """Mean next-token loss over all target tokens of the set."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(encoded), batch_size):
        loss_sum, n = token_loss_sum(model, collate(encoded[i : i + batch_size], pad_id))
        total += loss_sum.item()
        count += n
    return total / max(1, count)


def evaluate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    data: EvalSet,
    batch_size: int,
    exact: bool,
    max_new_tokens: int,
    group_by: str | None,
    prefix: str = "eval_",
) -> dict[str, float | dict[str, float]]:
    """Metrics dict: {prefix}loss, {prefix}ppl and, when exact, {prefix}accuracy (+ per group)."""
    loss = eval_loss(model, data.encoded, tokenizer.pad_token_id, batch_size)
    out: dict[str, float | dict[str, float]] = {f"{prefix}loss": loss, f"{prefix}ppl": math.exp(min(loss, 50.0))}
    if exact:
        preds = greedy_generate(model, tokenizer, data.prompts, max_new_tokens, batch_size)
        hits = [exact_match(p, ex.target) for p, ex in zip(preds, data.examples, strict=True)]
        out[f"{prefix}accuracy"] = sum(hits) / max(1, len(hits))
        if group_by:
            groups = [None if ex.meta.get(group_by) is None else str(ex.meta[group_by]) for ex in data.examples]
            by_group = grouped_accuracy(hits, groups)
            if by_group:
                out[f"{prefix}accuracy_by_{group_by}"] = by_group
    return out
