import math

import pytest
import torch

from fedtune.client import zeroth_order as zo
from fedtune.data.builtin.tasks import generate_tasks
from fedtune.data.tokenize import Encoder, collate
from fedtune.losses import token_loss_sum


def _batches(tok, n, bs):
    train, _ = generate_tasks(train_per_task=8, eval_per_task=1)
    enc, _ = Encoder(tok, "chat", None, 96).encode_all(train[:n])
    return [collate(enc[i : i + bs], tok.pad_token_id) for i in range(0, n, bs)]


def test_a_direction_is_a_function_of_its_seed_and_the_shapes(monkeypatch):
    monkeypatch.setattr(zo, "CHUNK", 7)  # several chunks per tensor, one cut mid-row
    a = [torch.zeros(3, 5), torch.zeros(4)]
    b = [torch.zeros(3, 5, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)]
    za, zb, zc = zo.direction(a, 11), zo.direction(b, 11), zo.direction(a, 12)
    assert all(torch.equal(x.double(), y) for x, y in zip(za, zb, strict=True))  # any dtype: the same z
    assert not torch.equal(za[0], zc[0])
    zo.move_(a, 11, 0.5)
    assert all(torch.equal(p, 0.5 * z) for p, z in zip(a, za, strict=True))  # moved chunk by chunk, in place
    # the second tensor's z does not depend on the first's size: each tensor has its own stream
    assert torch.equal(zo.direction([torch.zeros(9), torch.zeros(4)], 11)[1], za[1])


def test_directions_look_standard_normal():
    (z,) = zo.direction([torch.zeros(200_000)], 3)
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01


def test_moving_there_and_back_restores_the_weights_to_rounding():
    p = [torch.randn(1000), torch.randn(10, 10)]
    before = [t.clone() for t in p]
    zo.move_(p, 5, 1e-3)
    zo.move_(p, 5, -2e-3)
    zo.move_(p, 5, 1e-3)
    assert all(torch.allclose(x, y, atol=1e-6, rtol=0) for x, y in zip(p, before, strict=True))


def test_the_projected_gradient_is_the_directional_derivative(tiny_adapter, tiny):
    """(L(w + εz) - L(w - εz)) / 2ε against autograd's ∇L · z, to O(ε²)."""
    model, params = tiny_adapter.model, list(tiny_adapter.params.values())
    batch = _batches(tiny.tokenizer, 4, 4)[0]
    model.eval()
    total, n = token_loss_sum(model, batch)
    (total / n).backward()
    z = zo.direction(params, 21)
    exact = sum((p.grad.double() * d.double()).sum() for p, d in zip(params, z, strict=True)).item()
    for p in params:
        p.grad = None
    g, plus, minus = zo.projected_gradient(lambda: zo.mean_loss(model, batch)[0], params, 21, 1e-3)
    zo.move_(params, 21, 1e-3)  # back to w
    assert g == pytest.approx(exact, rel=0.02, abs=1e-3)
    assert plus != minus


def test_zo_sgd_lowers_the_loss_and_its_log_replays_the_update(tiny_adapter, tiny):
    model, params = tiny_adapter.model, list(tiny_adapter.params.values())
    batches = _batches(tiny.tokenizer, 16, 4) * 10  # 40 steps over 4 batches
    start = [p.detach().clone() for p in params]
    before = sum(zo.mean_loss(model, b)[0] for b in batches[:4])
    out = zo.train_zeroth_order(model, params, batches, lambda s: 5e-3, 1e-3, None, lambda s: 1000 + s)
    after = sum(zo.mean_loss(model, b)[0] for b in batches[:4])
    assert after < before and out.result.steps == 40 and not out.result.diverged
    assert [s.seed for s in out.steps] == [1000 + i for i in range(40)]
    trained = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, s in zip(params, start, strict=True):
            p.copy_(s)
    zo.replay_(params, [(s.seed, s.lr * s.projected) for s in out.steps if not s.skipped])
    for p, t in zip(params, trained, strict=True):  # the same update from (seed, η·g) alone, to rounding
        assert torch.allclose(p, t, atol=1e-5, rtol=0)


def test_a_step_above_the_clip_is_skipped_and_leaves_the_weights(tiny_adapter, tiny):
    model, params = tiny_adapter.model, list(tiny_adapter.params.values())
    batches = _batches(tiny.tokenizer, 8, 4)
    start = [p.detach().clone() for p in params]
    out = zo.train_zeroth_order(model, params, batches, lambda s: 1e-2, 1e-3, 1e-12, lambda s: s)
    assert all(s.skipped for s in out.steps) and out.result.lr_sum == 0.0
    assert all(torch.allclose(p, s, atol=1e-6, rtol=0) for p, s in zip(params, start, strict=True))


def test_a_non_finite_loss_stops_the_round_with_the_weights_put_back(tiny_adapter, tiny, monkeypatch):
    model, params = tiny_adapter.model, list(tiny_adapter.params.values())
    batches = _batches(tiny.tokenizer, 8, 4)
    start = [p.detach().clone() for p in params]
    monkeypatch.setattr(zo, "mean_loss", lambda *args: (math.inf, 1))
    out = zo.train_zeroth_order(model, params, batches, lambda s: 1e-2, 1e-3, None, lambda s: s)
    assert out.result.diverged and math.isnan(out.result.mean_loss) and "non-finite" in out.result.error
    assert all(torch.allclose(p, s, atol=1e-6, rtol=0) for p, s in zip(params, start, strict=True))


def test_what_a_direction_holds_at_once_is_one_chunk(monkeypatch):
    monkeypatch.setattr(zo, "CHUNK", 100)
    assert zo.direction_bytes([torch.zeros(30), torch.zeros(7, 9)]) == 4 * 63
    assert zo.direction_bytes([torch.zeros(1000)]) == 4 * 100  # a big tensor: one chunk
    assert zo.direction_bytes([torch.zeros(50, dtype=torch.bfloat16)]) == 4 * 50 + 2 * 50  # and its cast
