"""Examples -> token ids with response-only labels, and padded batches.

The same ``encode_prompt`` serves training and generation, so both see identical prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from fedtune.data.formats import Example
from fedtune.data.templates import TARGET_PREFIX, render_prompt

IGNORE = -100
Collate = Callable[[Sequence["Encoded"], int], dict[str, torch.Tensor]]  # (sequences, pad id) -> a batch


@dataclass(frozen=True)
class Encoded:
    input_ids: tuple[int, ...]  # prompt + target + eos
    prompt_len: int
    train_on_prompt: bool = False
    rejected_ids: tuple[int, ...] | None = None  # a preference pair's: the same prompt + rejected reply + eos

    def rejected(self) -> Encoded:
        """The pair's rejected sequence as a sequence of its own (same prompt, same loss positions)."""
        assert self.rejected_ids is not None
        return Encoded(self.rejected_ids, self.prompt_len, self.train_on_prompt)

    @property
    def num_target_tokens(self) -> int:
        return len(self.input_ids) - (0 if self.train_on_prompt else self.prompt_len)


@dataclass(frozen=True)
class Encoder:
    """Holds the tokenizer and template choices; encodes prompts and full training sequences."""

    tokenizer: PreTrainedTokenizerBase
    template: str
    system_prompt: str | None
    max_seq_len: int
    train_on_prompt: bool = False

    def encode_prompt(self, example: Example) -> list[int]:
        text = render_prompt(self.template, example, self.tokenizer, self.system_prompt)
        # chat templates write their own special tokens; plain templates get the tokenizer's defaults
        special = self.template != "chat"
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def encode(self, example: Example) -> tuple[Encoded, bool]:
        """Return (encoded, truncated). Over-long prompts lose their start; the target is kept (a pair's two
        replies both, the prompt cut to fit the longer one)."""
        prompt = self.encode_prompt(example)
        replies = [self._reply(example.target)]
        if example.rejected is not None:
            replies.append(self._reply(example.rejected))
        longest = max(len(r) for r in replies)
        truncated = len(prompt) + longest > self.max_seq_len
        if truncated:
            replies = [r[: self.max_seq_len - 1] for r in replies]
            longest = max(len(r) for r in replies)
            prompt = prompt[len(prompt) - (self.max_seq_len - longest) :]
        rejected = tuple(prompt + replies[1]) if len(replies) > 1 else None
        return Encoded(tuple(prompt + replies[0]), len(prompt), self.train_on_prompt, rejected), truncated

    def _reply(self, text: str) -> list[int]:
        """A target's token ids as training sees them: the template's prefix, the text, EOS."""
        ids = self.tokenizer(TARGET_PREFIX.get(self.template, "") + text, add_special_tokens=False)["input_ids"]
        return [*ids, self.tokenizer.eos_token_id]

    def encode_all(self, examples: Sequence[Example]) -> tuple[list[Encoded], int]:
        out, n_trunc = [], 0
        for ex in examples:
            enc, truncated = self.encode(ex)
            out.append(enc)
            n_trunc += truncated
        return out, n_trunc


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence; labels are IGNORE on padding and (by default) the prompt."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        start = 0 if e.train_on_prompt else e.prompt_len
        labels[i, start:n] = ids[i, start:n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_pairs(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Preference pairs as one batch: the B chosen sequences, then their B rejected ones (row B + i is row i's
    pair), padded as ``collate`` pads; ``chosen`` (2B,) marks the first half. Every item must be a pair."""
    if any(e.rejected_ids is None for e in batch):
        raise ValueError("collate_pairs needs preference pairs; an item has no rejected reply")
    out = collate([*batch, *(e.rejected() for e in batch)], pad_id)  # each (2B, T)
    out["chosen"] = torch.arange(2 * len(batch)) < len(batch)  # (2B,)
    return out


def stack_collated(batches: Sequence[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Collated batches one after another along the batch dimension, right-padded to the widest (as ``collate``
    pads): several clients' micro-batches in one forward."""
    width = max(b["input_ids"].shape[1] for b in batches)
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE}
    return {
        key: torch.cat([torch.nn.functional.pad(b[key], (0, width - b[key].shape[1]), value=v) for b in batches])
        for key, v in fill.items()
    }  # each (sum of B, width)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts for batched generation; returns (input_ids, attention_mask), each (B, T)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids, mask
