"""An SVD that does not fail where LAPACK's divide-and-conquer driver gives up.

torch's CPU SVD (LAPACK gesdd) can fail to converge on a finite matrix, e.g. a small core of tiny
LoRA updates (a seen case: 64 x 64, entries 1e-12 to 5e-4). The same matrix scaled to unit maximum,
or transposed, converges; the factors are then scaled or swapped back, which is exact algebra:
M = c·(U S Vh) for M/c, and M = (U S Vh)ᵀ = V S Uᵀ for Mᵀ.
"""

from __future__ import annotations

import torch


def svd(m: torch.Tensor, full_matrices: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vh with U diag(S) Vh = m, as ``torch.linalg.svd``; retried scaled, then transposed, if it fails."""
    try:
        return torch.linalg.svd(m, full_matrices=full_matrices)
    except torch.linalg.LinAlgError:
        pass
    scale = m.abs().max()
    if torch.isfinite(scale) and scale > 0:
        try:
            u, s, vh = torch.linalg.svd(m / scale, full_matrices=full_matrices)
            return u, s * scale, vh
        except torch.linalg.LinAlgError:
            pass
    u, s, vh = torch.linalg.svd(m.mT, full_matrices=full_matrices)  # a last try; its failure is raised
    return vh.mT, s, u.mT
