"""LoRA algebra for aggregation: pair up A/B tensors, exact weighted sums of products, rank-r refactorisation.

A LoRA module adds ΔW = s · B A to a frozen weight, with A (r, in), B (out, r) and s = alpha / r.
Averaging A and B separately is inexact: Σ_k p_k B_k A_k ≠ (Σ_k p_k B_k)(Σ_k p_k A_k). The exact
weighted sum is a product of stacked factors,

    Σ_k p_k s_k B_k A_k = [p_1 s_1 B_1, ..., p_K s_K B_K] @ [A_1; ...; A_K]      (out, R) @ (R, in), R = Σ r_k

so its SVD never needs the dense (out, in) matrix: QR both thin factors and take the SVD of the
small (R, R) core. Frobenius norms of such products come from R x R Gram matrices the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedtune.core import linalg

_A, _B = ".lora_A.", ".lora_B."


@dataclass(frozen=True)
class LoraPair:
    """The two tensors of one LoRA module in an adapter state."""

    module: str  # e.g. base_model.model.model.layers.0.self_attn.q_proj
    a_key: str  # ...q_proj.lora_A.weight, (r, in)
    b_key: str  # ...q_proj.lora_B.weight, (out, r)


def lora_pairs(keys: Sequence[str]) -> list[LoraPair]:
    """Every (A, B) pair among the keys, sorted by name (sums over pairs must not depend on dict
    order, which differs between a state built in memory and one loaded from a checkpoint);
    a lone A or B is an error."""
    keys = sorted(keys)
    pairs = []
    for a in keys:
        if _A not in a:
            continue
        b = a.replace(_A, _B)
        if b not in keys:
            raise ValueError(f"LoRA tensor {a} has no matching {b}")
        pairs.append(LoraPair(a.split(_A)[0], a, b))
    lone_b = {k for k in keys if _B in k} - {p.b_key for p in pairs}
    if lone_b:
        raise ValueError(f"LoRA tensors without their A: {sorted(lone_b)[:3]}")
    return pairs


def stacked_factors(
    bs: Sequence[torch.Tensor], as_: Sequence[torch.Tensor], coeffs: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B_stack, A_stack) in float64 with Σ_k c_k B_k A_k = B_stack @ A_stack."""
    b_stack = torch.cat([c * b.double() for b, c in zip(bs, coeffs, strict=True)], dim=1)  # (out, R)
    a_stack = torch.cat([a.double() for a in as_], dim=0)  # (R, in)
    return b_stack, a_stack


def svd_of_product(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (out, k), S (k,), Vh (k, in) with U diag(S) Vh = b @ a, without forming b @ a."""
    qb, rb = torch.linalg.qr(b)  # (out, k1), (k1, R)
    qa, ra = torch.linalg.qr(a.T)  # (in, k2), (k2, R)
    u, s, vh = linalg.svd(rb @ ra.T)  # core (k1, k2)
    return qb @ u, s, vh @ qa.T


def refactor(
    u: torch.Tensor,
    s: torch.Tensor,
    vh: torch.Tensor,
    rank: int,
    scale: float,
    dtype: torch.dtype,
    near: tuple[torch.Tensor, torch.Tensor] | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, tail energy) with scale · B A the best rank-`rank` approximation of U diag(S) Vh; A and B
    are written into ``out`` = (A, B) when given (views of a packed buffer, ``aggregation.flat``).

    The singular values are split evenly: B = U_r sqrt(S_r / scale), A = sqrt(S_r / scale) Vh_r.
    Tail energy is Σ_{i > rank} S_i², the squared Frobenius error of the truncation.

    With ``near`` = (A_prev, B_prev) the even split is rotated by the orthogonal Q that brings it
    closest to the previous factors (orthogonal Procrustes: Q = W Zᵀ for Bᵀ B_prev + A A_prevᵀ =
    W Σ Zᵀ). (B Q)(Qᵀ A) is the same product and the factors stay exactly as balanced as the even
    split; only the arbitrary rotation between rounds is removed.
    """
    keep = min(rank, s.numel())
    root = (s[:keep] / scale).sqrt()
    b = torch.zeros(u.shape[0], rank, dtype=torch.float64)
    a = torch.zeros(rank, vh.shape[1], dtype=torch.float64)
    b[:, :keep] = u[:, :keep] * root
    a[:keep] = root[:, None] * vh[:keep]
    if near is not None:
        a_prev, b_prev = (t.double() for t in near)
        w, _, zh = linalg.svd(b.T @ b_prev + a @ a_prev.T)  # (rank, rank) each
        q = w @ zh  # orthogonal
        b, a = b @ q, q.T @ a
    tail = float(s[keep:].pow(2).sum())
    if out is None:
        return a.to(dtype), b.to(dtype), tail
    return out[0].copy_(a), out[1].copy_(b), tail  # the cast on the copy rounds as .to(dtype) does


def product_inner(b1: torch.Tensor, a1: torch.Tensor, b2: torch.Tensor, a2: torch.Tensor) -> float:
    """<b1 a1, b2 a2>_F = tr((b1ᵀ b2)(a2 a1ᵀ)), from small Gram matrices."""
    return float(torch.trace((b1.double().T @ b2.double()) @ (a2.double() @ a1.double().T)))


def factor_averaging_error(
    bs: Sequence[torch.Tensor], as_: Sequence[torch.Tensor], weights: Sequence[float], scale: float
) -> tuple[float, float]:
    """(‖exact − naive‖_F², ‖exact‖_F²) for weights summing to 1, where exact = s Σ p_k B_k A_k
    and naive = s (Σ p_k B_k)(Σ p_k A_k): what averaging A and B separately loses."""
    bx, ax = stacked_factors(bs, as_, [scale * w for w in weights])
    b_bar = sum(w * b.double() for b, w in zip(bs, weights, strict=True)) * scale
    a_bar = sum(w * a.double() for a, w in zip(as_, weights, strict=True))
    xx, yy, xy = (
        product_inner(bx, ax, bx, ax),
        product_inner(b_bar, a_bar, b_bar, a_bar),
        product_inner(bx, ax, b_bar, a_bar),
    )
    return max(0.0, xx + yy - 2 * xy), xx


def relative(err_sq: float, total_sq: float) -> float:
    return math.sqrt(err_sq / total_sq) if total_sq > 0 else 0.0


def rank_of(params: dict[str, torch.Tensor]) -> int | None:
    """The LoRA rank of an adapter state (rows of its first A, or columns of its first B), or None."""
    for key in sorted(params):
        if _A in key:
            return params[key].shape[0]
    for key in sorted(params):
        if _B in key:
            return params[key].shape[1]
    return None


def rank_view(params: dict[str, torch.Tensor], rank: int, global_rank: int) -> dict[str, torch.Tensor]:
    """A global-rank state as a rank-`rank` adapter computing the first `rank` components of the same ΔW.

    peft scales by alpha / r, so the client's B absorbs s_global / s_client = rank / global_rank:
    (alpha / rank) · (B[:, :rank] · rank / global_rank) · A[:rank] = (alpha / global_rank) · B[:, :rank] A[:rank].
    """
    if rank == global_rank:
        return params
    out = dict(params)
    for p in lora_pairs(list(params)):
        out[p.a_key] = params[p.a_key][:rank].clone()
        out[p.b_key] = params[p.b_key][:, :rank] * (rank / global_rank)
    return out


def pad_to_rank(params: dict[str, torch.Tensor], global_rank: int) -> dict[str, torch.Tensor]:
    """Inverse of rank_view: a rank-r client adapter zero-padded to global rank, same ΔW (HetLoRA)."""
    out = dict(params)
    for p in lora_pairs(list(params)):
        a, b = params[p.a_key], params[p.b_key]
        r = a.shape[0]
        if r == global_rank:
            continue
        a_pad = torch.zeros(global_rank, a.shape[1], dtype=a.dtype)
        b_pad = torch.zeros(b.shape[0], global_rank, dtype=b.dtype)
        a_pad[:r], b_pad[:, :r] = a, b * (global_rank / r)
        out[p.a_key], out[p.b_key] = a_pad, b_pad
    return out
