import math

import pytest
import torch

from fedtune.client import forward_gradient as fg
from fedtune.client import zeroth_order as zo
from tests.client.test_zeroth_order import _batches


class _Quadratic(torch.nn.Module):
    """L(w) = Σ (w - target)²: its gradient is known exactly."""

    def __init__(self, n: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(n))
        self.target = torch.linspace(-1, 1, n)


def _quadratic_loss(model, batch):
    return ((model.w - model.target) ** 2).sum(), torch.tensor(1)


def _one_batch():
    return [{"input_ids": torch.ones(1, 2, dtype=torch.long), "labels": torch.ones(1, 2, dtype=torch.long)}]


def test_a_step_is_minus_lr_times_the_mean_of_its_perturbations_estimates():
    model = _Quadratic(12)
    params = [model.w]
    k, lr, eps = 6, 0.1, 1e-3
    result, log = fg.train_forward_gradient(
        model, params, _one_batch(), lambda s: lr, eps, None, lambda s: 77, k, None, 1, loss=_quadratic_loss
    )
    assert log[0].perturbations == k and result.steps == 1 and result.lr_sum == lr
    expected = torch.zeros(12)
    for i in range(k):  # by hand: each perturbation's two losses at w = 0 along its own direction
        (z,) = zo.direction([torch.zeros(12)], fg.candidate_seed(77, i, 0))
        d = ((((eps * z - model.target) ** 2).sum() - ((-eps * z - model.target) ** 2).sum()) / (2 * eps)).item()
        expected -= lr * d * z / k
    assert torch.allclose(model.w.detach(), expected, atol=1e-4)


def _estimate_cosine(n, k, candidates, reference_cosine, seed):
    """Cosine of one step's estimate with the true gradient of L = ‖w - t‖² at w = 0, its directions
    aligned with a reference at ``reference_cosine`` to that gradient (the rest of it a fixed random
    direction)."""
    model = _Quadratic(n)
    g = -2 * model.target
    noise = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    noise -= (noise @ g) / (g @ g) * g
    reference = reference_cosine * g / g.norm() + math.sqrt(1 - reference_cosine**2) * noise / noise.norm()
    fg.train_forward_gradient(
        model,
        [model.w],
        _one_batch(),
        lambda s: 1.0,
        1e-3,
        None,
        lambda s: seed,
        k,
        None,
        candidates,
        reference=[reference],
        loss=_quadratic_loss,
    )
    return float(torch.nn.functional.cosine_similarity(-model.w.detach(), g, dim=0))


def test_many_perturbations_estimate_the_gradient_and_aligned_ones_better():
    """The estimate's cosine with the true gradient grows with k; directions aligned with a reference that
    leans toward the gradient (FwdLLM's previous global gradient) point nearer it than plain ones, and
    aligning with an unrelated reference costs nothing on average (20 seeded draws each)."""
    mean = lambda *a, seeds=20: sum(_estimate_cosine(*a, seed) for seed in range(seeds)) / seeds  # noqa: E731
    by_k = [mean(40, k, 1, 0.0, seeds=10) for k in (2, 16, 64)]
    assert by_k == sorted(by_k) and by_k[-1] > 0.7
    plain = mean(400, 8, 1, 0.6)
    assert mean(400, 8, 16, 0.6) > 1.2 * plain
    assert mean(400, 8, 16, 0.0) > 0.8 * plain


def test_each_tensor_takes_the_candidate_best_aligned_with_the_reference():
    params = [torch.zeros(30), torch.zeros(4, 5)]
    reference = [torch.randn(30), torch.randn(4, 5)]
    seeds = fg._aligned_seeds(params, reference, 9, 2, 8)
    for t, r in enumerate(reference):
        cosines = []
        for j in range(8):
            s = fg.candidate_seed(9, 2, j)
            z = zo.direction(params, s)[t]  # tensor t's direction under seed s
            cosines.append(abs(float(torch.nn.functional.cosine_similarity(z.view(-1), r.view(-1), dim=0))))
        assert seeds[t] == fg.candidate_seed(9, 2, max(range(8), key=cosines.__getitem__))
    assert fg._aligned_seeds(params, None, 9, 2, 8) == [fg.candidate_seed(9, 2, 0)] * 2  # no reference


def test_the_split_half_variance_is_fwdllms():
    even, odd = [torch.randn(7), torch.randn(2, 3)], [torch.randn(7), torch.randn(2, 3)]
    flat = lambda ts: torch.cat([t.view(-1) for t in ts]) / 3  # noqa: E731  (each half a sum of 3)
    expected = torch.var(torch.stack([flat(even), flat(odd)]), dim=0).mean().item()  # FwdLLM's calculate_var
    assert fg._split_variance(even, odd, 3) == pytest.approx(expected, rel=1e-6)


def test_the_variance_paces_the_count():
    def counts(variance):
        model = _Quadratic(20)
        _, log = fg.train_forward_gradient(
            model,
            [model.w],
            _one_batch() * 3,
            lambda s: 0.01,
            1e-3,
            None,
            lambda s: s,
            16,
            variance,
            1,
            loss=_quadratic_loss,
        )
        return [s.perturbations for s in log], [s.variance for s in log]

    assert counts(None)[0] == [16, 16, 16]
    assert counts(1e9)[0] == [2, 2, 2]  # met at the first check
    paced, variances = counts(0.5)
    assert all(2 <= k <= 16 and k % 2 == 0 for k in paced)
    assert all(v <= 0.5 for k, v in zip(paced, variances, strict=True) if k < 16)


def test_a_perturbation_above_the_clip_is_left_out(tiny_adapter, tiny):
    model, params = tiny_adapter.model, list(tiny_adapter.params.values())
    batches = _batches(tiny.tokenizer, 8, 4)
    start = [p.detach().clone() for p in params]
    result, log = fg.train_forward_gradient(model, params, batches, lambda s: 1.0, 1e-3, 1e-12, lambda s: s, 4, None, 2)
    assert all(s.perturbations == 0 and s.clipped == 4 for s in log) and result.lr_sum == 0.0
    assert all(torch.allclose(p, s, atol=1e-6, rtol=0) for p, s in zip(params, start, strict=True))


def test_a_step_is_capped_at_the_zeroth_order_update_bound(monkeypatch):
    """The cap lr · clip · (√n + 10) binds only when a direction's norm passes √n + 10 (probability below
    e^-50): directions scaled 100x make it bind, and the step lands on it exactly."""
    chunks = zo.direction_chunks
    big = lambda *a: ((part, 100 * z) for part, z in chunks(*a))  # noqa: E731
    monkeypatch.setattr(zo, "direction_chunks", big)  # to perturb
    monkeypatch.setattr(fg, "direction_chunks", big)  # and to step
    model = _Quadratic(16)
    clip, lr = 2000.0, 0.5
    fg.train_forward_gradient(
        model, [model.w], _one_batch(), lambda s: lr, 1e-3, clip, lambda s: s, 4, None, 1, loss=_quadratic_loss
    )
    assert float(model.w.detach().norm()) == pytest.approx(lr * clip * (math.sqrt(16) + 10), rel=1e-4)


def test_forward_gradients_lower_the_loss_of_a_tiny_model(tiny_adapter, tiny):
    model, params = tiny_adapter.model, list(tiny_adapter.params.values())
    batches = _batches(tiny.tokenizer, 16, 4) * 3
    before = sum(zo.mean_loss(model, b)[0] for b in batches[:4])
    result, _ = fg.train_forward_gradient(model, params, batches, lambda s: 1e-2, 1e-3, None, lambda s: s, 2, None, 1)
    after = sum(zo.mean_loss(model, b)[0] for b in batches[:4])
    assert after < before and result.steps == 12 and not result.diverged
    assert result.input_tokens == 2 * 2 * sum(int(b["attention_mask"].sum()) for b in batches)  # 2 forwards each


def test_a_non_finite_loss_stops_the_round_with_the_weights_put_back(tiny_adapter, tiny, monkeypatch):
    model, params = tiny_adapter.model, list(tiny_adapter.params.values())
    batches = _batches(tiny.tokenizer, 8, 4)
    start = [p.detach().clone() for p in params]
    monkeypatch.setattr(fg, "mean_loss", lambda *args: (math.nan, 1))
    result, _ = fg.train_forward_gradient(model, params, batches, lambda s: 1e-2, 1e-3, None, lambda s: s, 4, None, 2)
    assert result.diverged and "non-finite" in result.error
    assert all(torch.allclose(p, s, atol=1e-6, rtol=0) for p, s in zip(params, start, strict=True))


def test_what_it_holds_is_three_float32_copies_and_a_chunk():
    params = [torch.zeros(30), torch.zeros(7, 9, dtype=torch.bfloat16)]
    assert fg.held_bytes(params) == 3 * 4 * 93 + zo.direction_bytes(params)
