"""Helpers shared by the codec tests: small adapter-like updates and layout checks."""

from __future__ import annotations

import torch

from fedtune.core.types import Params

PREFIX = "base_model.model.model.layers"


def adapter_update(seed: int = 0, layers: int = 3, r: int = 4, d: int = 48) -> Params:
    """A float32 LoRA-style delta: per layer q_proj lora_A (r, d) and lora_B (d, r), plus a norm (d,)."""
    g = torch.Generator().manual_seed(seed)
    out: Params = {}
    for i in range(layers):
        scale = 0.01 * (i + 1)  # later layers change more
        out[f"{PREFIX}.{i}.self_attn.q_proj.lora_A.weight"] = scale * torch.randn(r, d, generator=g)
        out[f"{PREFIX}.{i}.self_attn.q_proj.lora_B.weight"] = scale * torch.randn(d, r, generator=g)
    out["base_model.model.model.norm.weight"] = 0.001 * torch.randn(d, generator=g)
    return out


def assert_same_layout(decoded: Params, original: Params) -> None:
    """decode(encode(x)) has exactly x's keys, shapes and dtypes."""
    assert set(decoded) == set(original)
    for k, t in original.items():
        assert decoded[k].shape == t.shape, k
        assert decoded[k].dtype == t.dtype, k


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
