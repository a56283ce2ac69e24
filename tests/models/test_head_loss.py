"""The fused LM-head cross-entropy: autograd's loss and gradients, without the logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedtune.models import head_loss
from fedtune.models.head_loss import head_bypassed, head_cross_entropy_sum, plain_head


def _case(bias: bool, train_head: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(8, 50, bias=bias).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(50, 8, generator=g, dtype=torch.float64))
    head.requires_grad_(train_head)
    hidden = torch.randn(13, 8, generator=g, dtype=torch.float64, requires_grad=True)  # (P, H)
    targets = torch.randint(0, 50, (13,), generator=g)
    return head, hidden, targets


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("train_head", [False, True])
def test_loss_and_gradients_match_autograd_across_chunks(monkeypatch, bias, train_head):
    monkeypatch.setattr(head_loss, "CHUNK_ELEMENTS", 50 * 4)  # chunks of 4 positions: 13 = 4+4+4+1
    head, hidden, targets = _case(bias, train_head)
    params = [hidden, *[p for p in head.parameters() if p.requires_grad]]
    want = F.cross_entropy(head(hidden), targets, reduction="sum")
    want_grads = torch.autograd.grad(2.5 * want, params)
    got = head_cross_entropy_sum(hidden, head, targets)
    got_grads = torch.autograd.grad(2.5 * got, params)  # the incoming gradient scales everything
    assert torch.allclose(got, want, rtol=1e-12, atol=0)
    assert len(got_grads) == (3 if bias and train_head else 2 if train_head else 1)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert torch.allclose(g, w, rtol=1e-10, atol=1e-12)


def test_without_grad_it_only_sums_the_loss(monkeypatch):
    monkeypatch.setattr(head_loss, "CHUNK_ELEMENTS", 50 * 5)
    head, hidden, targets = _case(True, False)
    with torch.no_grad():
        got = head_cross_entropy_sum(hidden, head, targets)
        want = F.cross_entropy(head(hidden), targets, reduction="sum")
    assert not got.requires_grad and torch.allclose(got, want, rtol=1e-12, atol=0)


def test_it_keeps_no_vocabulary_wide_tensor_for_backward():
    head, hidden, targets = _case(False, False)
    kept: list[torch.Size] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.shape) or t, lambda t: t):
        head_cross_entropy_sum(hidden, head, targets)
    assert kept and all(50 not in shape for shape in kept)  # (P, H) at most, never (P, V)


def test_no_targets_give_a_zero_loss_that_still_backpropagates():
    head, hidden, _ = _case(False, False)
    loss = head_cross_entropy_sum(hidden[:0], head, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(hidden.grad, torch.zeros_like(hidden))


def test_only_plain_linear_heads_of_known_architectures_qualify(tiny):
    model = tiny.model
    assert plain_head(model) is model.lm_head
    model.config.model_type = "gemma2"  # caps its logits after the head
    assert plain_head(model) is None
    model.config.model_type = "llama"
    model.lm_head._hf_hook = object()  # accelerate places or offloads its weights
    assert plain_head(model) is None
    del model.lm_head._hf_hook
    model.lm_head = nn.Sequential(model.lm_head)  # not a plain nn.Linear
    assert plain_head(model) is None


def test_bypass_restores_the_head_even_on_error():
    head = nn.Linear(3, 5)
    x = torch.randn(2, 3)
    with pytest.raises(RuntimeError), head_bypassed(head):
        assert head(x) is x
        raise RuntimeError
    assert head(x).shape == (2, 5) and "forward" not in head.__dict__


def test_bypass_restores_a_forward_set_on_the_instance():
    head = nn.Linear(3, 5)
    wrapped = head.forward
    head.forward = lambda x: wrapped(x) * 0  # as a wrapper library would patch it
    patched = head.forward
    with head_bypassed(head):
        pass
    assert head.forward is patched and torch.equal(head(torch.ones(1, 3)), torch.zeros(1, 5))
