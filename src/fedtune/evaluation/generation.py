"""Batched greedy generation from the same prompts training uses."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from fedtune.data.tokenize import left_pad
from fedtune.models.device import model_device


@torch.no_grad()
def greedy_generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int,
) -> list[str]:
    """Decode up to max_new_tokens per prompt, stopping at EOS; returns the new text only."""
    model.eval()
    out: list[str] = []
    pad = tokenizer.pad_token_id
    device = model_device(model)
    for i in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[i : i + batch_size], pad)  # (B, T)
        ids, mask = ids.to(device), mask.to(device)
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )  # (B, T + new)
        out.extend(tokenizer.batch_decode(gen[:, ids.shape[1] :], skip_special_tokens=True))
    return out
