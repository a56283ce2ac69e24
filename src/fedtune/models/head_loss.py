"""The LM head and its cross-entropy in one pass over chunks of positions: no vocabulary-wide logits kept.

A plain loss keeps the (positions, vocabulary) log-probabilities for backward, and backward makes two
more tensors of that size; on a 49k-token vocabulary they outweigh a small model's other activations.
Here the forward pass takes the head's gradient as it goes, chunk by chunk: with targets t,
d(-log softmax(h W^T + b)[t]) / d logits = softmax - onehot(t), so each chunk's gradient with respect
to its hidden states (and to W, b where they train) is finished before the next chunk's logits exist.
Backward only scales what was kept: a (positions, hidden) tensor. Same FLOPs as autograd's path.

The model's own forward still runs (every PEFT method and the decoder stay as they are); only its
output head is swapped for the identity for the call, so the model returns the final hidden states
where it would return logits. That holds where the logits are the head's output and nothing else:
the architectures in ``PLAIN_HEAD`` with an ``nn.Linear`` head (a head with an adapter of its own, or
a model that scales or caps its logits, keeps the plain path).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

# model types whose causal-LM logits are exactly lm_head(final hidden states)
PLAIN_HEAD = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox", "phi3", "olmo", "olmo2"})
CHUNK_ELEMENTS = 1 << 24  # logits per chunk: 64 MiB in float32


def plain_head(model: nn.Module) -> nn.Linear | None:
    """The model's output head where its logits are exactly that head's output, else None."""
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if getattr(config, "model_type", None) not in PLAIN_HEAD or type(head) is not nn.Linear:
        return None
    if hasattr(head, "_hf_hook"):  # accelerate moves or offloads its weights around its forward
        return None
    return head


@contextmanager
def head_bypassed(head: nn.Linear) -> Iterator[None]:
    """For the block, ``head`` passes its input through: the model returns hidden states as "logits"."""
    own = head.__dict__.get("forward")  # a forward set on the instance before (a wrapper's), kept
    head.forward = _identity  # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def head_cross_entropy_sum(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor) -> torch.Tensor:
    """Σ_i -log softmax(head(hidden_i))[targets_i] in float32, for hidden (P, H) and targets (P,), all
    of them real targets; differentiable in ``hidden`` and in the head's parameters that train."""
    weight, bias = head.weight, head.bias  # (V, H), (V,) or None
    if not torch.is_grad_enabled() or not (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return sum((_chunk_nll(h, weight, bias, t) for h, t in _chunks(hidden, targets, weight)), _zero(weight))
    return _HeadCrossEntropy.apply(hidden, weight, bias, targets)


def _chunks(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor):
    step = max(1, CHUNK_ELEMENTS // weight.shape[0])
    for s in range(0, hidden.shape[0], step):
        yield hidden[s : s + step], targets[s : s + step]


def _wide(weight: torch.Tensor) -> torch.dtype:
    """The loss's dtype: float32, or the weights' own where wider."""
    return torch.promote_types(weight.dtype, torch.float32)


def _zero(weight: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=_wide(weight), device=weight.device)


def _chunk_log_probs(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.log_softmax(F.linear(h, weight, bias).to(_wide(weight)), dim=-1)  # (c, V), as autograd rounds


def _chunk_nll(h, weight, bias, t) -> torch.Tensor:
    return -_chunk_log_probs(h, weight, bias).gather(1, t[:, None]).sum()


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets):  # (P, H), (V, H), (V,) | None, (P,)
        want_w = ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        wide = _wide(weight)
        loss = _zero(weight)
        grad_hidden = torch.empty_like(hidden)  # (P, H)
        grad_weight = torch.zeros_like(weight, dtype=wide) if want_w else None  # (V, H)
        grad_bias = torch.zeros_like(bias, dtype=wide) if want_b else None  # (V,)
        start = 0
        for h, t in _chunks(hidden, targets, weight):
            log_probs = _chunk_log_probs(h, weight, bias)  # (c, V)
            loss = loss - log_probs.gather(1, t[:, None]).sum()
            g = log_probs.exp_()  # softmax, in place
            g[torch.arange(t.shape[0], device=t.device), t] -= 1  # d loss / d logits: softmax - onehot
            g = g.to(weight.dtype)
            grad_hidden[start : start + t.shape[0]] = g @ weight  # (c, H)
            if want_w:
                grad_weight.addmm_(g.t().to(wide), h.to(wide))  # (V, H) += (V, c) @ (c, H)
            if want_b:
                grad_bias += g.to(wide).sum(0)
            start += t.shape[0]
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.weight_dtype, ctx.bias_dtype = weight.dtype, None if bias is None else bias.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # grad_loss: a scalar
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        return (
            grad_hidden * grad_loss.to(grad_hidden.dtype),
            None if grad_weight is None else (grad_weight * grad_loss).to(ctx.weight_dtype),
            None if grad_bias is None else (grad_bias * grad_loss).to(ctx.bias_dtype),
            None,
        )


@torch.no_grad()
def head_log_probs(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log softmax(head(hidden_i))[targets_i], argmax_v head(hidden_i)_v) for hidden (P, H) and targets (P,),
    chunk by chunk: (P,) each; a negative target reads 0."""
    lp, top = [], []
    for h, t in _chunks(hidden, targets, head.weight):
        log_probs = _chunk_log_probs(h, head.weight, head.bias)  # (c, V)
        lp.append(log_probs.gather(1, t.clamp(min=0)[:, None])[:, 0].masked_fill(t < 0, 0.0))
        top.append(log_probs.argmax(1))
    if not lp:
        return torch.zeros(0, dtype=_wide(head.weight), device=hidden.device), targets.new_zeros(0)
    return torch.cat(lp), torch.cat(top)
