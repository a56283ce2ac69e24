"""Distilling an emulator toward the full model on public text (Offsite-Tuning's emulator distillation).

Only the emulator's middle blocks train; its adapter blocks, embeddings, final norm and head stay the
full model's. Each step on a batch of public token ids minimises, over the non-padding positions,

    L = α · KL(p_full(· | x_<t) ‖ p_emu(· | x_<t)) + (1 - α) · (−log p_emu(x_t | x_<t)),

α = 0.9 by default (FS-LLM's 0.9 KD + 0.1 LM), with AdamW at ``lr``. The full model is only read.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedtune.models.blocks import causal_lm, layout_of
from fedtune.paradigms.offsite.emulator import Sandwich


@dataclass(frozen=True)
class DistillSettings:
    steps: int = 100
    lr: float = 1e-4
    alpha: float = 0.9  # weight of the KL term; 1 - alpha on the LM loss
    seed: int = 0


def middle_parameters(emulator: nn.Module, sandwich: Sandwich) -> list[nn.Parameter]:
    """The parameters of the emulator's kept middle blocks (what distillation trains)."""
    lm = causal_lm(emulator)
    layout = layout_of(lm)
    blocks = getattr(getattr(lm, layout.inner), layout.blocks)
    middle = range(sandwich.bottom, sandwich.bottom + len(sandwich.kept))
    return [p for i in middle for p in blocks[i].parameters()]


def kd_lm_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, alpha: float
) -> torch.Tensor:
    """α·KL(teacher ‖ student) + (1-α)·next-token NLL, averaged over positions whose next token is real.
    logits (B, T, V); ids, mask (B, T)."""
    s = F.log_softmax(student_logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    t = F.log_softmax(teacher_logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    keep = (mask[:, :-1] * mask[:, 1:]).bool()  # (B, T-1): position and its next token both real
    kl = (t.exp() * (t - s)).sum(-1)  # (B, T-1)
    nll = -s.gather(-1, ids[:, 1:, None])[..., 0]  # (B, T-1)
    per_position = alpha * kl + (1 - alpha) * nll
    return per_position[keep].mean()


def distil(
    emulator: nn.Module,
    full: nn.Module,
    sandwich: Sandwich,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    settings: DistillSettings = DistillSettings(),
) -> list[float]:
    """Train the emulator's middle blocks toward ``full`` for ``settings.steps`` steps over ``batches``
    ((input_ids, attention_mask), each (B, T), cycled); the losses of the steps, in order."""
    params = middle_parameters(emulator, sandwich)
    trained = {id(p) for p in params}
    for p in emulator.parameters():
        p.requires_grad_(id(p) in trained)
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    batches = list(batches)
    if not batches:
        raise ValueError("distillation needs at least one batch of public text")
    losses = []
    emulator.train()
    full.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        for step in range(settings.steps):
            ids, mask = batches[step % len(batches)]
            with torch.no_grad():
                teacher = full(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
            student = emulator(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
            loss = kd_lm_loss(student, teacher, ids, mask, settings.alpha)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    emulator.eval()
    for p in emulator.parameters():
        p.requires_grad_(False)
    return losses
