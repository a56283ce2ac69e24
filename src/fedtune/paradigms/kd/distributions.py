"""Token distributions for KD-FedLLM: top-k from a model, the clients' consensus, the teacher, the loss.

A client sends, for each response position of the public slice, its k most likely tokens and their
log-probabilities. Outside its top-k, the client's distribution is unknown except for its total,
the tail mass tau = 1 - sum(top-k probabilities); we spread it uniformly over the V - k other
tokens. That makes every client's message a full distribution over the vocabulary V, so:

  consensus  c(v) = sum_i w_i p_i(v) / sum_i w_i,  with p_i(v) = its top-k probability, else tau_i / (V - k)
             (exact: c sums to 1), and the top-k of c with its own tail is what the server sends back;
  teacher    p(v) = the received probability for the k ids, tau / (V - k) for the rest, then
             tempered: p_T(v) ∝ p(v)^(1/T);
  loss       T^2 · mean over response positions of KL(p_T || softmax(z / T)), summed over the vocabulary
             (Hinton et al. 2015), where z are the student's logits.

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
    w = weights.float().reshape(n, -1).expand(n, positions)  # (n, P)
    total = w.sum(dim=0)  # (P,)
    out_ids, out_logp = [], []
    for start in range(0, positions, chunk):
        rows = slice(start, min(start + chunk, positions))
        m = rows.stop - rows.start
        base = torch.zeros(m)  # (m,) each client's uniform tail, weighted: the consensus off every top-k
        dense = torch.zeros(m, vocab_size)  # (m, V) what each client adds on its own top-k, above its tail
        for i, top in enumerate(tops):
            wi = w[i, rows] / total[rows]  # (m,)
            probs = top.logp[rows].exp()  # (m, k)
            uniform = tail_mass(top.logp[rows]) / (vocab_size - probs.shape[1])  # (m,)
            base += wi * uniform
            dense.scatter_add_(1, top.ids[rows], wi[:, None] * (probs - uniform[:, None]))
        dense += base[:, None]  # (m, V) the consensus distribution, summing to 1
        values, ids = dense.topk(k_out, dim=-1)  # (m, k_out)
        out_ids.append(ids)
        out_logp.append(values.clamp(min=torch.finfo(torch.float32).tiny).log())
    return TopK(torch.cat(out_ids), torch.cat(out_logp))


def teacher_log_probs(top: TopK, vocab_size: int, temperature: float) -> torch.Tensor:
    """(P, V) log p_T: the received top-k with the tail spread uniformly, tempered by 1/T and renormalised."""
    positions, k = top.ids.shape
    fill = (tail_mass(top.logp) / (vocab_size - k)).log()  # (P,) -inf where the top-k holds all the mass
    dense = fill[:, None].expand(positions, vocab_size).clone()  # (P, V)
    dense.scatter_(1, top.ids.long(), top.logp.float())
    return F.log_softmax(dense / temperature, dim=-1)


def kl_sum(log_p_teacher: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 · sum over positions of KL(p_T || softmax(z / T)), each KL summed over the vocabulary."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (P, V)
    p = log_p_teacher.exp()
    log_p = torch.where(p > 0, log_p_teacher, torch.zeros_like(log_p_teacher))  # 0 · log 0 = 0
    return temperature**2 * (p * (log_p - log_q)).sum()


def distillation_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor], temperature: float):
    """(T^2 · sum of KL over the batch's response positions, their number), for ``train_locally``.

    ``batch["teacher_log_probs"]`` is (P, V) for the batch's response positions in row-major order
    (example, then position), as ``target_logits`` lays out the student's.
    """
    logits, mask = target_logits(model, batch)  # (B, K, V), (B, K)
    student = logits[mask]  # (P, V)
    teacher = batch["teacher_log_probs"]
    if teacher.shape != student.shape:
        raise ValueError(f"teacher is {tuple(teacher.shape)} for {tuple(student.shape)} student positions")
    return kl_sum(teacher, student, temperature), int(mask.sum())


@torch.no_grad()
def score(model: torch.nn.Module, batch: dict[str, torch.Tensor], k: int) -> TopK:
    """The model's top-k at every response position of the batch, row-major (example, then position)."""
    logits, mask = target_logits(model, batch)
    return top_k_of(logits[mask], k)
