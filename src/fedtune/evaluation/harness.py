"""Held-out evaluation: token-mean loss and perplexity; exact-match accuracy by greedy generation; on
preference pairs, how often the chosen reply is preferred (by likelihood, and by implicit reward against a
reference model's).

Both come from ``scoring.score``: one forward per batch scores the targets and leaves the attention
cache that generation continues from, with the prefixes that prompts share run once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from fedtune.data.formats import Example
from fedtune.data.tokenize import Encoded, Encoder
from fedtune.evaluation.metrics import could_still_match, exact_match, grouped_accuracy
from fedtune.evaluation.scoring import score


@dataclass(frozen=True)
class EvalSet:
    """Held-out examples, encoded once: sequences for loss, prompts for generation."""

    examples: list[Example]
    encoded: list[Encoded]
    prompts: list[list[int]]

    @classmethod
    def build(cls, examples: Sequence[Example], encoder: Encoder) -> EvalSet:
        encoded, _ = encoder.encode_all(examples)
        prompts = [list(e.input_ids[: e.prompt_len]) for e in encoded]
        return cls(list(examples), encoded, prompts)

    @property
    def pairs(self) -> bool:
        """Whether every example is a preference pair (a rejected reply beside the target)."""
        return bool(self.encoded) and all(e.rejected_ids is not None for e in self.encoded)

    def scored_rows(self) -> tuple[list[list[int]], list[list[int]]]:
        """(prompts, continuations) whose continuation log-likelihoods make the loss: the
        target and EOS, or (trained on the prompt too) everything after the first token."""
        if any(e.train_on_prompt for e in self.encoded):
            ids = [list(e.input_ids) for e in self.encoded]
            return [s[:1] for s in ids], [s[1:] for s in ids]
        return self.prompts, [list(e.input_ids[e.prompt_len :]) for e in self.encoded]


def evaluate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    data: EvalSet,
    batch_size: int,
    exact: bool,
    max_new_tokens: int,
    group_by: str | None,
    prefix: str = "eval_",
    reference: Sequence[float] | None = None,
) -> dict[str, float | dict[str, float]]:
    """Metrics dict: {prefix}loss, {prefix}ppl and, when exact, {prefix}accuracy (+ per group); on preference
    pairs also ``pair_metrics``' (``reference``: the reference model's margins, ``pair_margins``)."""
    prompts, conts = data.scored_rows()
    joint = exact and prompts is data.prompts  # the scored prompts are the generation prompts: one pass
    s = score(
        model,
        tokenizer,
        prompts,
        conts,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens if joint else None,
        give_up=_hopeless(data),
    )
    loss = -sum(s.log_likelihood) / max(1, sum(s.tokens))
    out: dict[str, float | dict[str, float]] = {f"{prefix}loss": loss, f"{prefix}ppl": math.exp(min(loss, 50.0))}
    if data.pairs:
        margins = pair_margins(model, tokenizer, data, batch_size)
        out |= {f"{prefix}{k}": v for k, v in pair_metrics(margins, reference).items()}
    if exact:
        preds = s.generations if joint else generate(model, tokenizer, data, max_new_tokens, batch_size)
        hits = [exact_match(p, ex.target) for p, ex in zip(preds, data.examples, strict=True)]
        out[f"{prefix}accuracy"] = sum(hits) / max(1, len(hits))
        if group_by:
            groups = [None if ex.meta.get(group_by) is None else str(ex.meta[group_by]) for ex in data.examples]
            by_group = grouped_accuracy(hits, groups)
            if by_group:
                out[f"{prefix}accuracy_by_{group_by}"] = by_group
    return out


def pair_margins(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    data: EvalSet,
    batch_size: int,
) -> list[float]:
    """Per preference pair, log p(chosen | prompt) − log p(rejected | prompt) under ``model`` (replies with
    their EOS). Always the same computation, so that a model compared with itself gives margins equal to the
    bit."""
    chosen = [list(e.input_ids[e.prompt_len :]) for e in data.encoded]
    rejected = [list(e.rejected_ids[e.prompt_len :]) for e in data.encoded if e.rejected_ids is not None]
    better = score(model, tokenizer, data.prompts, chosen, batch_size=batch_size).log_likelihood
    worse = score(model, tokenizer, data.prompts, rejected, batch_size=batch_size).log_likelihood
    return [c - r for c, r in zip(better, worse, strict=True)]


def pair_metrics(margins: Sequence[float], reference: Sequence[float] | None = None) -> dict[str, float]:
    """preference_accuracy: the share of pairs whose chosen reply is the likelier one (a tie counts half).
    With the reference model's margins: reward_accuracy, the share whose implicit reward β·log(π/π_ref) ranks
    the chosen reply higher (a tie half: the reference itself scores exactly 0.5), and reward_margin, the mean
    of (log π/π_ref)(chosen) − (log π/π_ref)(rejected) in nats (β times it is DPO's reward margin)."""
    out = {"preference_accuracy": _share_positive(margins)}
    if reference is not None:
        gaps = [m - m0 for m, m0 in zip(margins, reference, strict=True)]
        out["reward_accuracy"] = _share_positive(gaps)
        out["reward_margin"] = sum(gaps) / max(1, len(gaps))
    return out


def _share_positive(values: Sequence[float]) -> float:
    """The share of ``values`` above zero, a zero counting half."""
    return sum(1.0 if v > 0 else 0.5 if v == 0 else 0.0 for v in values) / max(1, len(values))


def generate(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, data: EvalSet, max_new_tokens: int, batch_size: int
) -> list[str]:
    """Greedy text after each prompt of the set, each row stopped once it cannot be an exact match."""
    s = score(
        model,
        tokenizer,
        data.prompts,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        give_up=_hopeless(data),
    )
    return s.generations or []


def _hopeless(data: EvalSet):
    """Row i's text so far -> whether it can no longer be an exact match (its generation stops there)."""
    return lambda i, text: not could_still_match(text, data.examples[i].target)
