"""Several clients' LoRA adapters over one base model in one forward: rows routed to their client's tensors.

The batch is the clients' micro-batches stacked along the batch dimension, client k's in the
contiguous row block ``rows[k]``. While ``route`` is active every LoRA layer computes

    y[rows_k] = W x[rows_k] + s * B_k A_k x[rows_k]

with client k's own (A_k, B_k): per block, the operations peft's forward runs for one adapter
(``lora_B(lora_A(x)) * s``), or, when every block has as many rows, two batched products over the
stacked adapters (fewer, larger kernels: what a GPU wants). Rows never mix in a causal LM
(attention, norms and MLPs act per row), so client k's gradient of its own loss is what it would
be trained alone, up to float order. Vanilla LoRA on Linear layers without dropout only: dropout
would draw other masks than a client trained alone, and DoRA's norm couples rows of the weight.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from peft import PeftModel
from peft.tuners.lora import Linear as LoraLinear

from fedtune.adapters.adapter_model import ADAPTER, AdapterModel
from fedtune.core.types import Params


def joint_unsupported(adapter: AdapterModel) -> str | None:
    """Why these clients' adapters cannot train in one forward over this model; None if they can."""
    why = adapter.cfg.joint_misfit()
    if why is not None:
        return why
    if not isinstance(adapter.model, PeftModel) or len(adapter.adapter_names) > 1:
        return "the model holds no single peft LoRA adapter"
    layers = [m for m in adapter.model.modules() if hasattr(m, "lora_A") and ADAPTER in m.lora_A]
    if any(type(m) is not LoraLinear for m in layers):
        return "some target modules are not Linear layers"
    if any(m.lora_bias.get(ADAPTER, False) for m in layers):
        return "lora_bias is on"
    return None


class RoutedLoRA:
    """The LoRA layers of ``adapter`` and, per layer, the state names of its A and B."""

    def __init__(self, adapter: AdapterModel):
        why = joint_unsupported(adapter)
        if why is not None:
            raise ValueError(f"clients cannot train jointly on this adapter: {why}")
        self.adapter = adapter
        self.layers: list[tuple[LoraLinear, str, str]] = []
        for path, module in adapter.model.named_modules():
            if isinstance(module, LoraLinear) and ADAPTER in module.lora_A:
                self.layers.append((module, f"{path}.lora_A.weight", f"{path}.lora_B.weight"))
        names = {n for _, a, b in self.layers for n in (a, b)}
        if not set(adapter.params) <= names:
            raise ValueError(f"adapter tensors outside its LoRA layers: {sorted(set(adapter.params) - names)[:3]}")

    def leaves(self, params: Params) -> dict[str, torch.nn.Parameter]:
        """One client's trainable tensors: a fresh leaf per adapter tensor, starting at ``params``, where the
        adapter's own are (device and dtype)."""
        like = self.adapter.params
        return {k: torch.nn.Parameter(params[k].detach().to(like[k], copy=True)) for k in like}

    @contextmanager
    def route(self, clients: Sequence[dict[str, torch.Tensor]], rows: Sequence[int]) -> Iterator[None]:
        """For the block, rows ``rows[k]`` (a contiguous block, in order) use client k's tensors; a tensor a
        client lacks (FFA-LoRA's frozen A) is the layer's own."""
        if len(clients) != len(rows):
            raise ValueError(f"{len(clients)} clients for {len(rows)} row blocks")
        for layer, a_name, b_name in self.layers:
            a_own, b_own = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            pairs = [(c.get(a_name, a_own), c.get(b_name, b_own)) for c in clients]
            layer.forward = _routed(layer, pairs, list(rows))  # shadows the class's forward
        try:
            yield
        finally:
            for layer, _, _ in self.layers:
                del layer.forward


def _routed(layer: LoraLinear, pairs: list[tuple[torch.Tensor, torch.Tensor]], rows: list[int]):
    scaling = layer.scaling[ADAPTER]
    if len(rows) > 1 and len(set(rows)) == 1:  # equal blocks: two batched products for all clients
        a_all = torch.stack([a for a, _ in pairs])  # (K, r, in)
        b_all = torch.stack([b for _, b in pairs])  # (K, out, r)

        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # x (K*n, T, in)
            result = layer.base_layer(x, *args, **kwargs)  # (K*n, T, out)
            xs = x.to(a_all.dtype).reshape(len(rows), -1, x.shape[-1])  # (K, n*T, in)
            update = torch.bmm(torch.bmm(xs, a_all.transpose(1, 2)), b_all.transpose(1, 2)) * scaling  # (K, n*T, out)
            return (result + update.reshape(result.shape)).to(result.dtype)

        return forward

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # x (N, T, in), N = sum(rows)
        result = layer.base_layer(x, *args, **kwargs)  # (N, T, out)
        parts = [
            F.linear(F.linear(block.to(a.dtype), a), b) * scaling  # (n_k, T, r) -> (n_k, T, out)
            for block, (a, b) in zip(x.split(rows), pairs, strict=True)
        ]
        return (result + torch.cat(parts)).to(result.dtype)

    return forward
