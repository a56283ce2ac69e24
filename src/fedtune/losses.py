"""Losses over the positions that predict target tokens: what training, distillation and evaluation share.

Only positions that predict a target token go through the LM head (``logits_to_keep``): with
response-only loss that is a few positions per sequence instead of all of them. Prompt and
P-tuning prepend virtual tokens, which shifts every position by their number. The next-token loss
runs the head and its cross-entropy fused, chunk by chunk (``models.head_loss``), where the model's
head allows: only the target positions' hidden states reach the head, and no logits are kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from fedtune.adapters.adapter_model import virtual_token_offset
from fedtune.data.tokenize import IGNORE
from fedtune.models.device import batch_to, model_device
from fedtune.models.head_loss import head_bypassed, head_cross_entropy_sum, plain_head

LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, int]]  # -> (sum, positions)


def _target_outputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(the model's "logits" output (B, K, ·), targets (B, K)) at the K positions that any row needs."""
    batch = batch_to(batch, model_device(model))  # where the model is (models.device)
    targets = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
    keep = (targets != IGNORE).any(dim=0).nonzero().squeeze(1)  # (K,) positions any row needs
    offset = virtual_token_offset(model)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep + offset)
    return out.logits, targets[:, keep]


def _target_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, K, V) in float32, targets (B, K)) at the K positions that any row needs."""
    logits, targets = _target_outputs(model, batch)
    return logits.float(), targets


def target_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, K, V), mask (B, K)): ``logits[mask]`` is (P, V) for the batch's P target positions,
    in row-major order (example, then position)."""
    logits, targets = _target_logits(model, batch)
    return logits, targets != IGNORE


def token_loss_sum(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], fused: bool = True
) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over target positions, and how many there are. ``fused``: the
    head and its loss in chunks where the model's head allows (the same loss up to summation order)."""
    return block_loss_sums(model, batch, [batch["input_ids"].shape[0]], fused)[0]


def block_loss_sums(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], rows: Sequence[int], fused: bool = True
) -> list[tuple[torch.Tensor, int]]:
    """``token_loss_sum`` of each block of consecutive rows (``rows[k]`` of them), from one forward over the
    batch: several clients' micro-batches stacked (``adapters.routed_lora``)."""
    head = plain_head(model) if fused else None
    if head is not None:
        with head_bypassed(head):
            hidden, targets = _target_outputs(model, batch)  # (B, K, H), (B, K)
        out = []
        for h, t in zip(hidden.split(list(rows)), targets.split(list(rows)), strict=True):
            mask = t != IGNORE  # (b, K)
            out.append((head_cross_entropy_sum(h[mask], head, t[mask]), int(mask.sum())))  # (P, H), (P,)
        return out
    logits, targets = _target_logits(model, batch)  # (B, K, V), (B, K)
    out = []
    for lg, t in zip(logits.split(list(rows)), targets.split(list(rows)), strict=True):
        loss = F.cross_entropy(lg.reshape(-1, lg.size(-1)), t.reshape(-1), ignore_index=IGNORE, reduction="sum")
        out.append((loss, int((t != IGNORE).sum())))
    return out


def example_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Σ over examples of each one's mean next-token loss, and the examples counted: the loss of DP-SGD,
    where each example's gradient is clipped on its own (an example without targets adds nothing)."""
    per_position, counts = _position_losses(model, batch)  # (B, K), (B,)
    per_example = per_position.sum(dim=1) / counts.clamp(min=1)  # (B,)
    return per_example.sum(), int((counts > 0).sum())


def sequence_log_probs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B,) float32: each row's Σ over its target positions of log p(target token): a reply's log-likelihood
    given its prompt (a preference loss compares them)."""
    per_position, _ = _position_losses(model, batch)  # (B, K)
    return -per_position.sum(dim=1)  # (B,)


def _position_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(each row's next-token loss at each of the K kept positions (B, K), 0 where the row has no target;
    each row's target count (B,))."""
    logits, targets = _target_logits(model, batch)  # (B, K, V), (B, K)
    per_position = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE, reduction="none"
    ).view(targets.shape)  # (B, K)
    return per_position, (targets != IGNORE).sum(dim=1)
