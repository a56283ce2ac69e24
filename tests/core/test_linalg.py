from pathlib import Path

import pytest
import torch

from fedtune.core import linalg

STUCK = Path(__file__).with_name("gesdd_fails.pt")  # a 64 x 64 LoRA core torch's CPU SVD failed on (float64)


def _reconstructs(m, u, s, vh):
    assert torch.allclose(u @ torch.diag(s) @ vh, m, atol=1e-12 * max(1.0, float(m.abs().max())) + 1e-15)


def test_the_matrix_lapack_gave_up_on_is_decomposed():
    m = torch.load(STUCK)
    _reconstructs(m, *linalg.svd(m))


@pytest.mark.parametrize("failures", [1, 2])
def test_each_fallback_gives_a_true_decomposition(monkeypatch, failures):
    m = torch.randn(7, 5, dtype=torch.float64) * 1e-4
    real, calls = torch.linalg.svd, []

    def flaky(x, full_matrices=True):
        calls.append(x.shape)
        if len(calls) <= failures:
            raise torch.linalg.LinAlgError("failed to converge")
        return real(x, full_matrices=full_matrices)

    monkeypatch.setattr(torch.linalg, "svd", flaky)
    u, s, vh = linalg.svd(m)
    assert u.shape == (7, 5) and vh.shape == (5, 5) and calls[-1] == ((5, 7) if failures == 2 else (7, 5))
    _reconstructs(m, u, s, vh)
    assert torch.all(s[:-1] >= s[1:])  # still in descending order


def test_a_matrix_no_retry_helps_still_raises(monkeypatch):
    def never(x, full_matrices=True):
        raise torch.linalg.LinAlgError("failed to converge")

    monkeypatch.setattr(torch.linalg, "svd", never)
    with pytest.raises(torch.linalg.LinAlgError):
        linalg.svd(torch.ones(3, 3))
