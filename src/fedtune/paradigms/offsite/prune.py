"""Structured pruning of the emulator's middle: MLP channels and attention head groups (LLM-Pruner style).

A second compression after layer drop. In each kept middle block of a Llama-family emulator, a
*group* is a structure that is removed whole, so that the block stays a working block of smaller
matrices:

- an MLP channel j: row j of ``gate_proj`` and ``up_proj``, column j of ``down_proj``;
- a key/value head g with its query heads (grouped-query attention: the G = heads / kv_heads query
  heads that read it): rows of ``k_proj`` / ``v_proj`` for head g, rows of ``q_proj`` and columns of
  ``o_proj`` for its query heads.

Each group's importance is LLM-Pruner's first-order Taylor term summed over its weights,
I(group) = Σ_{w ∈ group} |w · ∂L/∂w|, with L the emulator's next-token loss on public batches
(Ma et al. 2023, "LLM-Pruner", element-wise importance aggregated by sum). A block keeps the
``round(n · keep)`` most important groups of each kind (at least one), in their original order.

A pruned emulator is still sent as tensors alone: a client rebuilds each pruned block from the
shapes it receives (``fit_shapes``), which must be such a pruning of the config's block.
"""

from __future__ import annotations

import torch
from torch import nn

from fedtune.core.errors import ConfigError
from fedtune.models.blocks import causal_lm, layout_of

MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")


def _blocks(model: nn.Module) -> nn.ModuleList:
    lm = causal_lm(model)
    layout = layout_of(lm)
    if layout.blocks != "layers" or not hasattr(lm.config, "num_key_value_heads"):
        raise ConfigError(
            f"paradigm.prune: pruning knows Llama-family blocks (q/k/v/o_proj, gate/up/down_proj); "
            f"model type {getattr(lm.config, 'model_type', None)!r} is not one"
        )
    return getattr(getattr(lm, layout.inner), layout.blocks)


def _head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def taylor_importance(
    model: nn.Module, middle: range, batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per middle block: (MLP channel importances (I,), KV-group importances (kv,)), from the gradients of the
    next-token loss over ``batches`` ((input_ids, attention_mask), each (B, T)) summed."""
    blocks = _blocks(model)
    weights = {(i, name): blocks[i].get_submodule(name).weight for i in middle for name in (*MLP, *ATTN)}
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
        w.grad = None
    model.eval()
    for ids, mask in batches:
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # (B, T-1, V)
        keep = (mask[:, :-1] * mask[:, 1:]).bool()  # (B, T-1)
        nll = torch.nn.functional.cross_entropy(logits[keep], ids[:, 1:][keep])
        nll.backward()
    config = causal_lm(model).config
    hd, groups = _head_dim(config), config.num_attention_heads // config.num_key_value_heads
    out = {}
    for i in middle:
        score = {name: (weights[i, name] * weights[i, name].grad).abs() for name in (*MLP, *ATTN)}
        channels = score["mlp.gate_proj"].sum(1) + score["mlp.up_proj"].sum(1) + score["mlp.down_proj"].sum(0)  # (I,)
        kv = (score["self_attn.k_proj"] + score["self_attn.v_proj"]).view(-1, hd, score["self_attn.k_proj"].shape[1])
        q = score["self_attn.q_proj"].view(-1, groups * hd, score["self_attn.q_proj"].shape[1])  # (kv, G·hd, H)
        o = score["self_attn.o_proj"].view(score["self_attn.o_proj"].shape[0], -1, groups * hd)  # (H, kv, G·hd)
        heads = kv.sum((1, 2)) + q.sum((1, 2)) + o.sum((0, 2))  # (kv,)
        out[i] = (channels, heads)
    for w in weights.values():
        w.grad = None
        w.requires_grad_(False)
    return out


def _top(scores: torch.Tensor, keep: float) -> torch.Tensor:
    n = max(1, round(len(scores) * keep))
    return torch.sort(torch.topk(scores, n).indices).values  # the most important, in their original order


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=weight.dtype)
    layer.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
    return layer


def _replace(block: nn.Module, name: str, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    old = block.get_submodule(name)
    w, b = old.weight.detach(), old.bias.detach() if old.bias is not None else None
    if rows is not None:
        w, b = w[rows], (b[rows] if b is not None else None)
    if cols is not None:
        w = w[:, cols]
    owner, _, attr = name.rpartition(".")
    setattr(block.get_submodule(owner), attr, _linear(w, b))


def prune(model: nn.Module, middle: range, importance: dict, mlp_keep: float, heads_keep: float) -> dict[str, int]:
    """Remove the least important groups of each middle block in place; how many of each kind were kept."""
    blocks = _blocks(model)
    config = causal_lm(model).config
    hd, groups = _head_dim(config), config.num_attention_heads // config.num_key_value_heads
    kept = {"mlp_channels": 0, "kv_heads": 0}
    for i in middle:
        channels, heads = importance[i]
        block = blocks[i]
        c = _top(channels, mlp_keep)
        _replace(block, "mlp.gate_proj", rows=c)
        _replace(block, "mlp.up_proj", rows=c)
        _replace(block, "mlp.down_proj", cols=c)
        g = _top(heads, heads_keep)
        kv_rows = (g[:, None] * hd + torch.arange(hd)).reshape(-1)  # (g·hd,)
        q_rows = (g[:, None] * groups * hd + torch.arange(groups * hd)).reshape(-1)  # (g·G·hd,)
        _replace(block, "self_attn.k_proj", rows=kv_rows)
        _replace(block, "self_attn.v_proj", rows=kv_rows)
        _replace(block, "self_attn.q_proj", rows=q_rows)
        _replace(block, "self_attn.o_proj", cols=q_rows)
        kept["mlp_channels"] += len(c)
        kept["kv_heads"] += len(g)
    return kept


def fit_shapes(model: nn.Module, middle: range, tensors: dict[str, torch.Tensor]) -> None:
    """Make a weightless (meta) emulator's middle blocks take the shapes of ``tensors`` where they are a pruning
    of the config's: ValueError unless every changed block is one (gate/up rows = down columns; k/v rows whole
    heads, q rows and o columns G query heads for each, as the config groups them)."""
    lm = causal_lm(model)
    prefix = {n: m for n, m in lm.named_modules()}
    blocks = getattr(getattr(lm, layout_of(lm).inner), layout_of(lm).blocks)
    block_prefix = {id(m): n for n, m in prefix.items()}
    for i in middle:
        at = block_prefix[id(blocks[i])]
        shape = {name: tensors.get(f"{at}.{name}.weight") for name in (*MLP, *ATTN)}
        own = {name: blocks[i].get_submodule(name).weight.shape for name in (*MLP, *ATTN)}
        if all(s is not None and s.shape == own[n] for n, s in shape.items()):
            continue
        if any(s is None for s in shape.values()) or not hasattr(lm.config, "num_key_value_heads"):
            raise ValueError(f"block {i} of the emulator sent is not a pruning this model's blocks allow")
        hd = _head_dim(lm.config)
        groups = lm.config.num_attention_heads // lm.config.num_key_value_heads
        g, u, d = (shape[n].shape for n in MLP)
        q, k, v, o = (shape[n].shape for n in ATTN)
        h = own["mlp.down_proj"][0]
        ok = (
            g[1] == u[1] == h and g[0] == u[0] == d[1] >= 1 and d[0] == h and g[0] <= own["mlp.gate_proj"][0]
            and k == v and k[1] == h and k[0] % hd == 0 and 1 <= k[0] // hd <= lm.config.num_key_value_heads
            and q[1] == h and q[0] == k[0] * groups and o[0] == h and o[1] == q[0]
        )  # fmt: skip
        if not ok:
            raise ValueError(f"block {i} of the emulator sent is not a pruning this model's blocks allow")
        for name in (*MLP, *ATTN):
            old = blocks[i].get_submodule(name)
            rows, cols = shape[name].shape
            owner, _, attr = name.rpartition(".")
            bias = old.bias is not None
            new = nn.Linear(cols, rows, bias=bias, device="meta", dtype=old.weight.dtype)
            setattr(blocks[i].get_submodule(owner), attr, new)
