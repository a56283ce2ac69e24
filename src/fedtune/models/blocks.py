"""Where a causal LM family keeps its parts: the embeddings, the decoder blocks, the final norm.

``LAYOUTS`` (by ``config.model_type``): Llama-family models (llama, mistral, qwen2, qwen3; SmolLM2 is a
Llama) and GPT-2. Split learning cuts a model at block boundaries by it (``adapters/split.py``); the
FLOP count of a client's round sums its blocks by it (``client/cost.py``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fedtune.core.errors import ConfigError

Blocks = tuple[list[int], str]  # adapter.layers resolved for a model: (block indices, the attribute holding them)


@dataclass(frozen=True)
class BlockLayout:
    """Where a model family keeps its parts, and how one decoder block is called."""

    inner: str  # attribute of the causal LM holding the embeddings, blocks and final norm
    blocks: str  # attribute of ``inner``: the ModuleList of decoder blocks
    norm: str  # attribute of ``inner``: the final norm
    block_name: re.Pattern  # a parameter name's block index (group 1)
    embeddings: tuple[str, ...]  # attributes of ``inner``: the embedding modules (with the first part)
    embed: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # (inner, ids, positions) -> (B, T, H)
    rotary: bool  # blocks take (cos, sin) position embeddings computed by ``inner.rotary_emb``


def _llama_embed(inner: nn.Module, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return inner.embed_tokens(ids)


def _gpt2_embed(inner: nn.Module, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return inner.drop(inner.wte(ids) + inner.wpe(positions))


_LLAMA = BlockLayout("model", "layers", "norm", re.compile(r"\.layers\.(\d+)\."), ("embed_tokens",), _llama_embed, True)
LAYOUTS: dict[str, BlockLayout] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3"), _LLAMA),
    "gpt2": BlockLayout("transformer", "h", "ln_f", re.compile(r"\.h\.(\d+)\."), ("wte", "wpe"), _gpt2_embed, False),
}


def layout_of(model: nn.Module) -> BlockLayout:
    """The block layout of a (peft-wrapped) causal LM, or ConfigError naming the supported families."""
    kind = getattr(getattr(causal_lm(model), "config", None), "model_type", None)
    if kind not in LAYOUTS:
        raise ConfigError(
            f"fedtune does not know the block layout of model type {kind!r} (split learning needs it); supported: "
            f"{', '.join(sorted(LAYOUTS))} (Llama-family models such as SmolLM2, and GPT-2)"
        )
    return LAYOUTS[kind]


def blocks_of(model: nn.Module) -> tuple[nn.ModuleList, nn.Module] | None:
    """(decoder blocks, the causal LM) of a model of a known layout; None for any other."""
    lm = causal_lm(model)
    layout = LAYOUTS.get(getattr(getattr(lm, "config", None), "model_type", None))
    if layout is None:
        return None
    return getattr(getattr(lm, layout.inner), layout.blocks), lm


def causal_lm(model: nn.Module) -> nn.Module:
    """The causal LM itself, inside a peft wrapper or not."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model
