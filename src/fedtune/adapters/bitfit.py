"""BitFit (Ben Zaken et al. 2022): train only the bias terms of the base model."""

from __future__ import annotations

from torch import nn

from fedtune.core.errors import ConfigError


def bias_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """name -> parameter of every bias in the model (empty for bias-free models such as Llama)."""
    return {n: p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias"}


class BitFitTuner:
    """``adapter.method=bitfit`` for AdapterModel: the base model's own biases are the adapter."""

    def attach(self, base: nn.Module, cfg) -> None:
        if not bias_parameters(base):
            raise ConfigError(
                f"adapter.method=bitfit trains only bias terms, and this model ({type(base).__name__}) has none "
                "(Llama-family models such as SmolLM2 are bias-free). Pick another adapter.method (lora, ia3, "
                "bottleneck, ...) or a model with biases (e.g. GPT-2, Qwen2, or tiny-llama-bias)"
            )

    def parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return bias_parameters(model)

    def export_meta(self, cfg) -> dict:
        return {}

    def restore(self, base: nn.Module, meta: dict) -> dict[str, nn.Parameter]:
        return bias_parameters(base)


TUNER = BitFitTuner()
