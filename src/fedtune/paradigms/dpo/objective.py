"""DPO's and IPO's losses over a batch of preference pairs, and the reference model's log-probabilities.

A pair batch (``data.tokenize.collate_pairs``) holds B chosen sequences, then their B rejected ones; each
row's log-likelihood of its reply is ``losses.sequence_log_probs``. The reference's are taken once, before
training, into the batch (``reference``); the loss compares the policy's with them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fedtune.data.tokenize import IGNORE
from fedtune.losses import sequence_log_probs

Batch = dict[str, torch.Tensor]


def preference_losses(
    policy: torch.Tensor,
    reference: torch.Tensor,
    beta: float,
    kind: str = "sigmoid",
    label_smoothing: float = 0.0,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B,) per-pair losses from (2B,) reply log-likelihoods under the policy and the reference, the B chosen
    rows first. h = (log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r));
    sigmoid (DPO, Rafailov et al. 2023): −(1−ε)·log σ(β·h) − ε·log σ(−β·h);
    ipo (Azar et al. 2023): (h − 1/(2β))², the log-likelihoods divided by ``lengths`` (2B,) first."""
    ratios = policy - reference.to(policy.device)  # (2B,)
    if kind == "ipo":
        if lengths is None:
            raise ValueError("ipo needs each reply's length")
        ratios = ratios / lengths.to(policy.device).clamp(min=1)
    half = ratios.shape[0] // 2
    h = ratios[:half] - ratios[half:]  # (B,)
    if kind == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    if kind == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown preference loss {kind!r}; allowed: sigmoid, ipo")


def reply_lengths(batch: Batch) -> torch.Tensor:
    """(2B,) how many reply tokens (EOS included) each row's log-likelihood sums."""
    return (batch["labels"][:, 1:] != IGNORE).sum(dim=1)


def preference_loss_sum(
    model: torch.nn.Module, batch: Batch, beta: float, kind: str = "sigmoid", label_smoothing: float = 0.0
) -> tuple[torch.Tensor, int]:
    """(Σ over the batch's pairs of their loss, the pairs): a ``losses.LossFn`` on a batch with ``reference``."""
    policy = sequence_log_probs(model, batch)  # (2B,)
    losses = preference_losses(policy, batch["reference"], beta, kind, label_smoothing, reply_lengths(batch))
    return losses.sum(), int(losses.shape[0])


def with_reference(model: torch.nn.Module, batches: Sequence[Batch]) -> list[Batch]:
    """``batches`` with ``reference`` (2B,): each row's reply log-likelihood under ``model`` as it is now."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return [{**b, "reference": sequence_log_probs(model, b).detach().cpu()} for b in batches]
    finally:
        model.train(was_training)
