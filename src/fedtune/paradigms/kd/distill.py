"""Distil a teacher distribution on public examples into an adapter, and score public examples.

The same code runs on a client (logits on the downlink: the consensus into its own adapter) and on
the server (adapter on the downlink: the consensus into the global adapter). Batches are drawn
from the slice by a generator seeded by the caller's key, so any round replays exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from fedtune.adapters.adapter_model import AdapterModel
from fedtune.client.batching import micro_batches
from fedtune.client.cost import FlopModel
from fedtune.client.local_training import LocalResult, train_locally
from fedtune.paradigms.kd.distributions import TopK, distillation_loss_sum, score
from fedtune.paradigms.kd.public import PublicSet


@dataclass(frozen=True)
class DistillSettings:
    steps: int
    batch_size: int
    lr: float
    temperature: float
    max_grad_norm: float | None
    optimizer: str
    weight_decay: float = 0.0


class _TeacherBatches(Sequence):
    """Micro-batches of public examples with their teacher rows, built when training reaches them."""

    def __init__(self, public: PublicSet, indices: torch.Tensor, teacher: TopK, plan, pad: int):
        self.public, self.indices, self.teacher, self.plan, self.pad = public, indices, teacher, plan, pad
        self.offsets = public.offsets(indices)

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        rows = [j for j in self.plan[i]]  # positions within the slice
        batch = self.public.batch([self.indices[j] for j in rows], self.pad)
        take = torch.cat([torch.arange(self.offsets[j], self.offsets[j + 1]) for j in rows])  # (P_b,)
        batch["teacher_ids"], batch["teacher_logp"] = self.teacher.ids[take], self.teacher.logp[take]  # (P_b, k)
        return batch


def distil(
    adapter: AdapterModel,
    public: PublicSet,
    indices: torch.Tensor,
    teacher: TopK,
    settings: DistillSettings,
    pad_id: int,
    key: list[int],
) -> LocalResult:
    """``settings.steps`` optimizer steps of KL(teacher || adapter) on the public examples ``indices``; ``key``:
    the random stream's (``core.rng``: a client's ``KD_DISTIL``, the server's ``SERVER_DISTIL``)."""
    rng = np.random.default_rng(key)
    torch_seed = int(rng.integers(2**63 - 1))
    plan = micro_batches(len(indices), settings.batch_size, 1, rng, local_steps=settings.steps)
    batches = _TeacherBatches(public, indices, teacher, plan, pad_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch_seed)
        return train_locally(
            adapter.model,
            list(adapter.params.values()),
            batches,
            1,
            lambda _step: settings.lr,
            settings.weight_decay,
            settings.max_grad_norm,
            optimizer=settings.optimizer,
            loss=partial(distillation_loss_sum, temperature=settings.temperature),
            cost=FlopModel.of_model(adapter.model),
        )


def score_public(
    adapter: AdapterModel, public: PublicSet, indices: torch.Tensor, k: int, batch_size: int, pad_id: int
) -> tuple[TopK, float]:
    """The adapter's top-k at every response position of the public examples ``indices``, in their order,
    and the analytic FLOPs of those forward passes (0 for a model of unknown block layout)."""
    adapter.model.eval()
    cost = FlopModel.of_model(adapter.model)
    ids, logp, flops = [], [], 0.0
    for start in range(0, len(indices), batch_size):
        batch = public.batch(indices[start : start + batch_size], pad_id)
        top = score(adapter.model, batch, k)
        ids.append(top.ids)
        logp.append(top.logp)
        flops += cost.inference(batch) if cost is not None else 0.0
    if not ids:
        return TopK(torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k)), 0.0
    return TopK(torch.cat(ids), torch.cat(logp)), flops
