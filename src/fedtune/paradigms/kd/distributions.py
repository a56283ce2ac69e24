"""Token distributions for KD-FedLLM: top-k from a model, the clients' consensus, the teacher, the loss.

A client sends, for each response position of the public slice, its k most likely tokens and their
log-probabilities. Outside its top-k, the client's distribution is unknown except for its total,
the tail mass tau = 1 - sum(top-k probabilities).

  consensus  c(v) = sum_i w_i p_i(v) / sum_i w_i, where client i's unknown tail is spread uniformly:
             p_i(v) = its top-k probability, else tau_i / (V - k). Exact (c sums to 1); the server
             keeps the top k' of c, whose own tail is the rest of its mass.
  teacher    the received top-k and its tail as k + 1 outcomes, tempered: p_T(v) ∝ p(v)^(1/T) for
             the k tokens and tau^(1/T) for the tail.
  loss       T^2 · mean over response positions of KL(p_T || q_T), q_T = softmax(z / T) of the
             student's logits z, summed over the vocabulary with the teacher's tail shaped like the
             student's own (the one choice that adds nothing the teacher did not say). The tail's
             terms then sum to p_T(tail) · log(p_T(tail) / q_T(tail)), so
             KL = sum_{v in top-k} p_T(v) log(p_T(v) / q_T(v)) + p_T(tail) log(p_T(tail) / q_T(tail)).
             (Spreading the tail uniformly instead would smooth the student's labels over the whole
             vocabulary, and tempering a uniform tail over 49k tokens would hand it most of the mass.)

All functions are pure tensor code; docs/algorithms/kd.md has the formulas and their sources.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from fedtune.losses import target_logits

ROWS_PER_CHUNK = 256  # positions densified at once when forming the consensus: (256, V) float32


class TopK(NamedTuple):
    ids: torch.Tensor  # (P, k) int64 token ids, most likely first
    logp: torch.Tensor  # (P, k) float32 log-probabilities


def id_dtype(vocab_size: int) -> torch.dtype:
    """The narrowest integer type that holds every token id of this vocabulary."""
    if vocab_size <= 2**8:
        return torch.uint8
    if vocab_size <= 2**16:
        return torch.uint16
    return torch.int32


@torch.no_grad()
def top_k_of(logits: torch.Tensor, k: int) -> TopK:
    """logits (P, V) -> the k most likely tokens at each position and their log-probabilities (T = 1)."""
    logp = F.log_softmax(logits.float(), dim=-1)  # (P, V)
    values, ids = logp.topk(k, dim=-1)  # (P, k) each
    return TopK(ids, values)


def tail_mass(logp: torch.Tensor) -> torch.Tensor:
    """(P, k) log-probabilities -> (P,) probability outside them, clamped at 0 against rounding."""
    return (1.0 - logp.exp().sum(dim=-1)).clamp(min=0.0)


def consensus(
    tops: Sequence[TopK], weights: torch.Tensor, vocab_size: int, k_out: int, chunk: int = ROWS_PER_CHUNK
) -> TopK:
    """The weighted mean of the clients' distributions, position by position; its top ``k_out``.

    ``tops[i]`` is client i's (P, k_i); ``weights`` is (n,) per client or (n, P) per client and
    position (confidence weighting). Clients are summed in the order given.
    """
    n, positions = len(tops), tops[0].ids.shape[0]
    w = weights.double().reshape(n, -1).expand(n, positions)  # (n, P), float64: no overflow from huge weights
    share = (w / w.sum(dim=0)).float()  # (n, P) each client's share at each position
    out_ids, out_logp = [], []
    for start in range(0, positions, chunk):
        rows = slice(start, min(start + chunk, positions))
        m = rows.stop - rows.start
        base = torch.zeros(m)  # (m,) each client's uniform tail, weighted: the consensus off every top-k
        dense = torch.zeros(m, vocab_size)  # (m, V) what each client adds on its own top-k, above its tail
        for i, top in enumerate(tops):
            wi = share[i, rows]  # (m,)
            probs = top.logp[rows].exp()  # (m, k)
            uniform = tail_mass(top.logp[rows]) / (vocab_size - probs.shape[1])  # (m,)
            base += wi * uniform
            dense.scatter_add_(1, top.ids[rows], wi[:, None] * (probs - uniform[:, None]))
        dense += base[:, None]  # (m, V) the consensus distribution, summing to 1
        values, ids = dense.topk(k_out, dim=-1)  # (m, k_out)
        out_ids.append(ids)
        out_logp.append(values.clamp(min=torch.finfo(torch.float32).tiny).log())
    return TopK(torch.cat(out_ids), torch.cat(out_logp))


class Teacher(NamedTuple):
    """A tempered teacher at each position: its top-k tokens and, as one outcome, the rest."""

    ids: torch.Tensor  # (P, k) int64
    log_p: torch.Tensor  # (P, k) log p_T of the top-k tokens
    log_tail: torch.Tensor  # (P,) log p_T of everything else (-inf when the top-k holds all the mass)


def temper(top: TopK, temperature: float) -> Teacher:
    """p_T over the k tokens and the tail, each probability raised to 1/T and renormalised."""
    tail = tail_mass(top.logp).log()  # (P,) -inf if none
    scaled = torch.cat([top.logp.float(), tail[:, None]], dim=1) / temperature  # (P, k + 1)
    log_p = scaled - scaled.logsumexp(dim=1, keepdim=True)  # rows sum to 1 even if the top-k's mass exceeds 1
    return Teacher(top.ids.long(), log_p[:, :-1], log_p[:, -1])


def kl_sum(teacher: Teacher, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 · sum over positions of KL(p_T || softmax(z / T)), summed over the vocabulary (module docstring)."""
    z = student_logits.float() / temperature  # (P, V)
    log_norm = z.logsumexp(dim=1)  # (P,)
    log_q_top = z.gather(1, teacher.ids) - log_norm[:, None]  # (P, k)
    log_q_tail = z.scatter(1, teacher.ids, float("-inf")).logsumexp(dim=1) - log_norm  # (P,)
    top = (teacher.log_p.exp() * (teacher.log_p - log_q_top)).sum()
    p_tail = teacher.log_tail.exp()
    tail = torch.where(p_tail > 0, p_tail * (teacher.log_tail - log_q_tail), torch.zeros_like(p_tail)).sum()
    return temperature**2 * (top + tail)


def distillation_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor], temperature: float):
    """(T^2 · sum of KL over the batch's response positions, their number), for ``train_locally``.

    ``batch["teacher_ids"]`` and ``batch["teacher_logp"]`` are (P, k) for the batch's response
    positions in row-major order (example, then position), as ``target_logits`` lays out the student's.
    """
    logits, mask = target_logits(model, batch)  # (B, K, V), (B, K)
    student = logits[mask]  # (P, V)
    teacher = temper(TopK(batch["teacher_ids"], batch["teacher_logp"]), temperature)
    if teacher.ids.shape[0] != student.shape[0]:
        raise ValueError(f"{teacher.ids.shape[0]} teacher positions for {student.shape[0]} student positions")
    return kl_sum(teacher, student, temperature), int(mask.sum())


@torch.no_grad()
def score(model: torch.nn.Module, batch: dict[str, torch.Tensor], k: int) -> TopK:
    """The model's top-k at every response position of the batch, row-major (example, then position)."""
    logits, mask = target_logits(model, batch)
    return top_k_of(logits[mask], k)
