"""Full tuning of chosen blocks (``adapter.method=blocks``): every weight of the blocks in ``adapter.layers``
trains and travels, the rest of the model stays frozen.

No module is added: the adapter is the blocks' own parameters, by the model's own names
(``model.layers.0.self_attn.q_proj.weight``), as BitFit's are its biases. Offsite-Tuning's clients tune
their adapter blocks this way; on parameter sharing it is partial fine-tuning (every block when
``adapter.layers`` is unset: the whole model but its embeddings, final norm and head).
"""

from __future__ import annotations

from torch import nn

from fedtune.core.errors import ConfigError
from fedtune.models.blocks import Blocks, blocks_of


def block_parameters(model: nn.Module, indices: list[int] | None) -> dict[str, nn.Parameter]:
    """name -> parameter of every weight of the blocks ``indices`` (None: every block)."""
    found = blocks_of(model)
    if found is None:
        kind = getattr(getattr(model, "config", None), "model_type", None)
        raise ConfigError(f"adapter.method=blocks: fedtune does not know where model type {kind!r} keeps its blocks")
    blocks, _ = found
    chosen = {id(p) for i in (range(len(blocks)) if indices is None else indices) for p in blocks[i].parameters()}
    return {n: p for n, p in model.named_parameters() if id(p) in chosen}


class BlockTuner:
    """``adapter.method=blocks`` for AdapterModel: the chosen blocks' own weights are the adapter."""

    def attach(self, base: nn.Module, cfg, blocks: Blocks | None) -> dict[str, nn.Parameter]:
        return block_parameters(base, None if blocks is None else blocks[0])

    def export_meta(self, cfg, blocks: Blocks | None) -> dict:
        return {"layers": None if blocks is None else blocks[0]}

    def restore(self, base: nn.Module, meta: dict) -> dict[str, nn.Parameter]:
        return block_parameters(base, meta.get("layers"))


TUNER = BlockTuner()
