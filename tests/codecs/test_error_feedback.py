"""Error feedback: the residual identity, error that vanishes over rounds (and does not without EF), state handling."""

from __future__ import annotations

import pytest
import torch

from fedtune.codecs import Chain, Quantize, RandomK, TopK
from tests.codecs.helpers import gen


def run_rounds(chain: Chain, rounds: int, checkpoints: tuple[int, ...], seed: int = 0):
    """Updates x_t = mu + noise (a consistent direction); -> ({T: ||Σx - Σx̂|| / ||Σx||}, Σx - Σx̂, state)."""
    g = gen(seed)
    mu = torch.randn(16, 32, generator=g)
    state: dict[str, torch.Tensor] = {}
    true_sum = torch.zeros(16, 32, dtype=torch.float64)
    sent_sum = torch.zeros(16, 32, dtype=torch.float64)
    rel = {}
    for t in range(1, rounds + 1):
        x = {"w": mu + torch.randn(16, 32, generator=g)}
        packed, state = chain.encode(x, state, g)
        true_sum += x["w"].double()
        sent_sum += chain.decode(packed)["w"].double()
        if t in checkpoints:
            rel[t] = float((true_sum - sent_sum).norm() / true_sum.norm())
    return rel, true_sum - sent_sum, state


@pytest.mark.parametrize("codec", [TopK(0.05), RandomK(0.05)], ids=["topk", "randk"])
def test_error_feedback_sends_what_compression_dropped(codec):
    rel, gap, state = run_rounds(Chain([codec], error_feedback=True), 200, (10, 200))
    residual = state["w"]
    assert residual.dtype == torch.float32
    assert torch.allclose(gap, residual.double(), atol=1e-3 * float(residual.abs().max()))  # Σx - Σx̂ = e_T
    assert rel[200] < 0.2 and rel[200] < 0.5 * rel[10]


@pytest.mark.parametrize("codec", [TopK(0.05), RandomK(0.05)], ids=["topk", "randk"])
def test_without_error_feedback_the_error_stays(codec):
    rel, _, state = run_rounds(Chain([codec]), 200, (10, 200))
    assert state == {}
    assert rel[200] > 0.5 and rel[200] > 0.8 * rel[10]


def test_first_round_residual_is_compression_error_and_state_is_new():
    x = {"a": torch.randn(4, 8, generator=gen(1)), "i": torch.arange(3)}
    chain = Chain([TopK(0.25)], error_feedback=True)
    state = {"gone": torch.ones(2)}  # the residual of a tensor absent from this update
    packed, new_state = chain.encode(x, state, gen())
    assert new_state is not state and state == {"gone": state["gone"]}
    assert set(new_state) == {"gone", "a"}  # int tensors get no residual; absent keys keep theirs
    assert new_state["gone"] is state["gone"]
    assert torch.equal(new_state["a"], x["a"] - chain.decode(packed)["a"])


def test_residual_is_added_before_encoding():
    chain = Chain([TopK(0.5)], error_feedback=True)
    x = {"w": torch.tensor([1.0, 0.0, 0.0, 0.0])}
    state = {"w": torch.tensor([0.0, 5.0, -4.0, 0.5])}  # corrected = [1, 5, -4, 0.5]
    packed, new_state = chain.encode(x, state, gen())
    assert chain.decode(packed)["w"].tolist() == [0.0, 5.0, -4.0, 0.0]
    assert new_state["w"].tolist() == [1.0, 0.0, 0.0, 0.5]


def test_half_precision_update_keeps_float32_residual():
    x = {"w": torch.randn(8, 16, generator=gen(2)).to(torch.bfloat16)}
    chain = Chain([Quantize(4)], error_feedback=True)
    packed, state = chain.encode(x, {}, gen())
    decoded = chain.decode(packed)
    assert decoded["w"].dtype == torch.bfloat16 and state["w"].dtype == torch.float32
    assert torch.allclose(state["w"], x["w"].float() - decoded["w"].float())


def test_shape_mismatch_is_an_error():
    chain = Chain([TopK(0.5)], error_feedback=True)
    with pytest.raises(ValueError, match="residual"):
        chain.encode({"w": torch.ones(4)}, {"w": torch.ones(3)}, gen())
