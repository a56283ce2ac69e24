"""BitFit (Ben Zaken et al. 2022): train only the bias terms of the base model."""

from __future__ import annotations

from torch import nn


def bias_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """name -> parameter of every bias in the model (empty for bias-free models such as Llama)."""
    return {n: p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias"}
