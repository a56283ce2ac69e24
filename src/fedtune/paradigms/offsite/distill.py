"""Distilling an emulator toward the full model on public text (Offsite-Tuning's emulator distillation).

Only the emulator's middle blocks train; its adapter blocks, embeddings, final norm and head stay the
full model's. Each step on a batch of public token ids minimises, over the non-padding positions,

    L = α · D + (1 - α) · (−log p_emu(x_t | x_<t)),  with D either
    logits:  KL(p_full(· | x_<t) ‖ p_emu(· | x_<t))                       (FS-LLM; α = 0.9 there)
    hidden:  Σ_t ‖h_full,t − h_emu,t‖² / Σ_t ‖h_full,t‖²                   (Offsite-Tuning's distillation)

where h is the middle's output: the hidden state entering the first top adapter block, the same blocks
below it on both models. AdamW at ``lr``, with the schedule ``client.schedule.lr_at`` gives a round
(constant, linear or cosine decay after a linear warmup). The full model is only read.
``cached_distil`` keys the result by the content of everything it depends on (the full model's tensors,
the sandwich, the settings, the public batches), so a rerun loads the distilled blocks instead of
training them again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from fedtune.client.schedule import lr_at
from fedtune.models.blocks import causal_lm, layout_of
from fedtune.paradigms.offsite.emulator import Sandwich
from fedtune.reporting.console import bar_disabled


@dataclass(frozen=True)
class DistillSettings:
    steps: int = 100
    lr: float = 1e-4
    alpha: float = 0.9  # weight of the distillation term; 1 - alpha on the LM loss
    seed: int = 0
    loss: str = "logits"  # logits | hidden
    schedule: str = "constant"  # constant | linear | cosine, after warmup
    warmup_ratio: float = 0.0

    @classmethod
    def of(cls, cfg: Any, seed: int) -> DistillSettings:
        """From ``paradigm.distil`` or ``paradigm.realign`` (settings.Teaching)."""
        return cls(cfg.steps, cfg.lr, cfg.alpha, seed, cfg.loss, cfg.schedule, cfg.warmup_ratio)

    def lr_at(self, step: int) -> float:
        return lr_at(self.lr, self.schedule, self.warmup_ratio, step, self.steps, 1, 1, scope="round")


def middle_parameters(emulator: nn.Module, sandwich: Sandwich) -> list[nn.Parameter]:
    """The parameters of the emulator's kept middle blocks (what distillation trains)."""
    lm = causal_lm(emulator)
    layout = layout_of(lm)
    blocks = getattr(getattr(lm, layout.inner), layout.blocks)
    middle = range(sandwich.bottom, sandwich.bottom + len(sandwich.kept))
    return [p for i in middle for p in blocks[i].parameters()]


def _next_token(
    logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-probabilities (B, T-1, V), next-token NLL (B, T-1), the positions whose token and next token are
    both real (B, T-1)) of logits (B, T, V) for ids, mask (B, T)."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    keep = (mask[:, :-1] * mask[:, 1:]).bool()
    return logp, -logp.gather(-1, ids[:, 1:, None])[..., 0], keep


def kd_lm_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, alpha: float
) -> torch.Tensor:
    """α·KL(teacher ‖ student) + (1-α)·next-token NLL, averaged over positions whose next token is real.
    logits (B, T, V); ids, mask (B, T)."""
    s, nll, keep = _next_token(student_logits, ids, mask)  # (B, T-1, V), (B, T-1), (B, T-1)
    t = F.log_softmax(teacher_logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    kl = (t.exp() * (t - s)).sum(-1)  # (B, T-1)
    per_position = alpha * kl + (1 - alpha) * nll
    return per_position[keep].mean()


def hidden_lm_loss(
    student_logits: torch.Tensor,
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    alpha: float,
) -> torch.Tensor:
    """α·Σ‖h_t − h_s‖² / Σ‖h_t‖² over real positions + (1-α)·next-token NLL (as ``kd_lm_loss``).
    logits (B, T, V); hidden (B, T, H); ids, mask (B, T)."""
    real = mask.bool()  # (B, T)
    t, s = teacher_hidden[real].float(), student_hidden[real].float()  # (N, H)
    rse = (t - s).pow(2).sum() / t.pow(2).sum().clamp_min(1e-12)
    if alpha == 1:
        return rse
    _, nll, keep = _next_token(student_logits, ids, mask)  # (B, T-1) each
    return alpha * rse + (1 - alpha) * nll[keep].mean()


def middle_output(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, top: int) -> tuple[torch.Tensor, Any]:
    """(the hidden state entering the first of the ``top`` last blocks (B, T, H), the model's output)."""
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    # hidden_states[i] is block i's input (i < n): the first top block is block n - top
    return out.hidden_states[len(out.hidden_states) - 1 - top], out


def distil(
    emulator: nn.Module,
    full: nn.Module,
    sandwich: Sandwich,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    settings: DistillSettings = DistillSettings(),
    progress: bool = False,
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
        bar = tqdm(range(settings.steps), desc="distilling the emulator", unit="step", disable=bar_disabled(progress))
        for step in bar:
            ids, mask = batches[step % len(batches)]
            for group in opt.param_groups:
                group["lr"] = settings.lr_at(step)
            if settings.loss == "hidden":
                with torch.no_grad():
                    target, _ = middle_output(full, ids, mask, sandwich.top)  # (B, T, H)
                h, out = middle_output(emulator, ids, mask, sandwich.top)
                loss = hidden_lm_loss(out.logits, h, target, ids, mask, settings.alpha)
            else:
                with torch.no_grad():
                    teacher = full(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
                student = emulator(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
                loss = kd_lm_loss(student, teacher, ids, mask, settings.alpha)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
        bar.close()
    emulator.eval()
    for p in emulator.parameters():
        p.requires_grad_(False)
    return losses


def content_key(
    full_state: Mapping[str, torch.Tensor],
    sandwich: Sandwich,
    settings: DistillSettings,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    start: Mapping[str, torch.Tensor] | None = None,
) -> str:
    """SHA-256 over the full model's tensors (names, dtypes, shapes, bytes), the sandwich, the settings, the
    public batches and ``start``, the middle the distillation starts from (a pruned one differs from the kept
    blocks as they are): equal exactly when a distillation would repeat itself."""
    h = hashlib.sha256()
    h.update(json.dumps({"sandwich": asdict(sandwich), "settings": asdict(settings)}, sort_keys=True).encode())
    for state in (full_state, start or {}):
        h.update(b"|state|")
        for name in sorted(state):
            t = state[name].detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    for ids, mask in batches:
        for t in (ids, mask):
            h.update(t.detach().cpu().to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def cached_distil(
    emulator: nn.Module,
    full: nn.Module,
    full_state: Mapping[str, torch.Tensor],
    sandwich: Sandwich,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    settings: DistillSettings,
    cache: Path,
    progress: bool = False,
) -> tuple[list[float], bool]:
    """``distil``, or its result loaded from ``cache`` when the same distillation ran before: (the losses of
    its steps, whether it came from the cache). Written whole or not at all (a temporary file, renamed)."""
    batches = list(batches)
    names = middle_names(emulator, sandwich)
    own = dict(emulator.named_parameters())
    key = content_key(full_state, sandwich, settings, batches, {n: own[n] for n in names})
    path = cache / f"{key}.safetensors"
    if path.is_file():
        stored = load_file(str(path))
        meta = json.loads((cache / f"{key}.json").read_text())
        with torch.no_grad():
            own = dict(emulator.named_parameters())
            for name in names:
                own[name].copy_(stored[name])
        return list(meta["losses"]), True
    losses = distil(emulator, full, sandwich, batches, settings, progress)
    cache.mkdir(parents=True, exist_ok=True)
    own = dict(emulator.named_parameters())
    tmp = cache / f".{key}.{os.getpid()}.tmp"
    save_file({n: own[n].detach().cpu().contiguous() for n in names}, str(tmp))
    (cache / f"{key}.json").write_text(json.dumps({"losses": losses, "settings": asdict(settings)}))
    os.replace(tmp, path)  # the weights last: a key with weights has its losses
    return losses, False


def middle_names(emulator: nn.Module, sandwich: Sandwich, own: Mapping[str, nn.Parameter] | None = None) -> list[str]:
    """The names of the middle blocks' parameters: in ``emulator`` (default), or among ``own`` (name ->
    parameter, e.g. the plain model's names of a model a tuner has since wrapped)."""
    ids = {id(p) for p in middle_parameters(emulator, sandwich)}
    named = own.items() if own is not None else emulator.named_parameters()
    return [n for n, p in named if id(p) in ids]
