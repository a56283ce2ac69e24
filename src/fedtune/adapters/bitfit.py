"""BitFit (Ben Zaken et al. 2022): train only the bias terms of the base model."""

from __future__ import annotations

from torch import nn

from fedtune.adapters.block_tuning import block_parameters
from fedtune.core.errors import ConfigError
from fedtune.models.blocks import Blocks


def bias_parameters(model: nn.Module, blocks: list[int] | None = None) -> dict[str, nn.Parameter]:
    """name -> parameter of every bias in the model, or in its blocks ``blocks`` only (empty for bias-free
    models such as Llama)."""
    found = {n: p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias"}
    if blocks is None:
        return found
    inside = block_parameters(model, blocks)
    return {n: p for n, p in found.items() if n in inside}


class BitFitTuner:
    """``adapter.method=bitfit`` for AdapterModel: the base model's own biases are the adapter."""

    def attach(self, base: nn.Module, cfg, blocks: Blocks | None) -> dict[str, nn.Parameter]:
        if not bias_parameters(base):
            raise ConfigError(
                f"adapter.method=bitfit trains only bias terms, and this model ({type(base).__name__}) has none "
                "(Llama-family models such as SmolLM2 are bias-free). Pick another adapter.method (lora, ia3, "
                "bottleneck, ...) or a model with biases (e.g. GPT-2, Qwen2, or tiny-llama-bias)"
            )
        return bias_parameters(base, None if blocks is None else blocks[0])

    def export_meta(self, cfg, blocks: Blocks | None) -> dict:
        return {"layers": None if blocks is None else blocks[0]}

    def restore(self, base: nn.Module, meta: dict) -> dict[str, nn.Parameter]:
        return bias_parameters(base, meta.get("layers"))


TUNER = BitFitTuner()
