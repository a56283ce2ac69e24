"""Bottleneck adapters (Houlsby et al. 2019): a small down/up projection after attention and after the MLP.

peft has no Houlsby-style adapter, so this is a minimal tuner of our own. Each targeted Linear f
(by default ``o_proj``, the attention output, and ``down_proj``, the MLP output, i.e. right before
each residual add) becomes

    y = f(x) + U · act(D · f(x))          D: (dim, out), U: (out, dim), U = 0 at start

so the adapted model equals the base model until training moves U.
"""

from __future__ import annotations

import torch
from torch import nn

from fedtune.models.blocks import Blocks, blocks_of


class Bottleneck(nn.Module):
    """A Linear followed by a residual bottleneck adapter; ``base`` stays frozen."""

    def __init__(self, base: nn.Linear, dim: int, dropout: float = 0.0):
        super().__init__()
        self.base = base
        out = base.out_features
        kw = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.adapter_down = nn.Linear(out, dim, **kw)
        self.adapter_up = nn.Linear(dim, out, **kw)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)  # (..., out)
        return h + self.adapter_up(self.drop(self.act(self.adapter_down(h))))


def inject_bottlenecks(
    model: nn.Module, targets: list[str], dim: int, dropout: float = 0.0, blocks: list[int] | None = None
) -> list[str]:
    """Wrap every Linear whose leaf name is in ``targets`` (inside the blocks ``blocks`` only, when given);
    return the wrapped module paths (sorted)."""
    inside = None if blocks is None else {id(m) for i in blocks for m in blocks_of(model)[0][i].modules()}
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and name.rsplit(".", 1)[-1] in targets
        and (inside is None or id(module) in inside)
    ]
    for name, module in found:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, Bottleneck(module, dim, dropout))
    return sorted(name for name, _ in found)


def bottleneck_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """name -> parameter of every adapter projection (the trainable tensors)."""
    return {n: p for n, p in model.named_parameters() if ".adapter_down." in n or ".adapter_up." in n}


class BottleneckTuner:
    """``adapter.method=bottleneck`` for AdapterModel: attach, trainable tensors, export and restore."""

    def attach(self, base: nn.Module, cfg, blocks: Blocks | None) -> dict[str, nn.Parameter]:
        if not inject_bottlenecks(base, cfg.targets(), cfg.bottleneck_dim, cfg.dropout, blocks and blocks[0]):
            raise ValueError("none of them is a Linear layer of this model")
        return bottleneck_parameters(base)

    def export_meta(self, cfg, blocks: Blocks | None) -> dict:
        return {
            "target_modules": cfg.targets(),
            "bottleneck_dim": cfg.bottleneck_dim,
            "dropout": cfg.dropout,
            "layers": None if blocks is None else blocks[0],
        }

    def restore(self, base: nn.Module, meta: dict) -> dict[str, nn.Parameter]:
        dropout, layers = meta.get("dropout", 0.0), meta.get("layers")
        inject_bottlenecks(base, meta["target_modules"], meta["bottleneck_dim"], dropout, layers)
        return bottleneck_parameters(base)


TUNER = BottleneckTuner()
