"""KD's distributions: the loss pinned against a hand computation, the consensus against its definition."""

from __future__ import annotations

import math

import pytest
import torch

from fedtune.paradigms.kd.distributions import (
    TopK,
    consensus,
    distillation_loss_sum,
    id_dtype,
    kl_sum,
    temper,
    top_k_of,
)


def _top(ids, probs) -> TopK:
    return TopK(torch.tensor(ids), torch.tensor(probs).log())


def test_distillation_loss_matches_a_hand_computed_value():
    """V = 4, one position; teacher top-2 = {2: 0.6, 0: 0.3}, tail 0.1; T = 2. By hand: temper the three
    outcomes, shape the teacher's tail like the student's, then the KL summed over the vocabulary, times T²."""
    t, z = 2.0, [1.0, 0.0, 2.0, -1.0]
    a = [0.6 ** (1 / t), 0.3 ** (1 / t), 0.1 ** (1 / t)]
    p2, p0, tail = (x / sum(a) for x in a)
    q = [math.exp(x / t) for x in z]
    q = [x / sum(q) for x in q]
    rest = q[1] + q[3]
    pt = [p0, tail * q[1] / rest, p2, tail * q[3] / rest]  # over tokens 0..3
    expected = t**2 * sum(a_ * math.log(a_ / b) for a_, b in zip(pt, q, strict=True))
    teacher = temper(_top([[2, 0]], [[0.6, 0.3]]), t)
    assert torch.allclose(teacher.log_p.exp(), torch.tensor([[p2, p0]]), atol=1e-6)
    got = kl_sum(teacher, torch.tensor([z]), t)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # the usual mistakes give other values: no T², or a mean over the vocabulary
    assert got.item() != pytest.approx(expected / t**2, rel=1e-3)
    assert got.item() != pytest.approx(expected / 4, rel=1e-3)


def test_the_loss_is_zero_when_the_student_is_the_teacher_and_positive_otherwise():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(4))
    teacher = temper(top_k_of(logits, 40 - 1), 1.0)  # all but one token: the tail is exactly that token
    assert kl_sum(teacher, logits, 1.0).item() == pytest.approx(0.0, abs=1e-5)
    assert kl_sum(teacher, logits.flip(1), 1.0).item() > 0.1


def test_distillation_loss_is_per_response_position_and_ignores_padding(tiny):
    """Two examples of different lengths in one padded batch: the loss is the sum over their response
    positions only, exactly what each gives alone."""
    from fedtune.data.builtin.tasks import generate_tasks
    from fedtune.data.tokenize import Encoder, collate

    tok, model = tiny.tokenizer, tiny.model
    enc = Encoder(tok, "chat", None, 96).encode_all(generate_tasks(train_per_task=2, eval_per_task=1)[0][:2])[0]
    assert len(enc[0].input_ids) != len(enc[1].input_ids)
    vocab = model.get_output_embeddings().weight.shape[0]
    positions = [e.num_target_tokens for e in enc]
    top = top_k_of(torch.randn(sum(positions), vocab, generator=torch.Generator().manual_seed(0)), 5)
    both = collate(enc, tok.pad_token_id) | {"teacher_ids": top.ids, "teacher_logp": top.logp}
    total, n = distillation_loss_sum(model, both, 2.0)
    assert n == sum(positions)
    parts = [
        distillation_loss_sum(model, collate([e], tok.pad_token_id) | {"teacher_ids": i, "teacher_logp": lp}, 2.0)[0]
        for e, i, lp in zip(enc, top.ids.split(positions), top.logp.split(positions), strict=True)
    ]
    assert torch.allclose(total, sum(parts), rtol=1e-5)


def test_teacher_at_temperature_one_is_the_sent_distribution_and_tempering_flattens_it():
    top = _top([[3, 1]], [[0.5, 0.2]])
    t1 = temper(top, 1.0)
    assert torch.allclose(t1.log_p.exp(), torch.tensor([[0.5, 0.2]])) and t1.log_tail.exp().item() == pytest.approx(0.3)
    t3 = temper(top, 3.0)
    assert t3.log_p.exp().sum() + t3.log_tail.exp() == pytest.approx(1.0)
    assert t3.log_p.exp()[0, 0] < 0.5 and t3.log_tail.exp() > 0.3  # flatter, over k + 1 outcomes only


def test_a_top_k_holding_all_the_mass_leaves_no_tail_and_no_nan():
    teacher = temper(_top([[0, 1]], [[0.75, 0.25]]), 2.0)
    assert torch.isneginf(teacher.log_tail).all()
    student = torch.randn(1, 5, requires_grad=True)
    loss = kl_sum(teacher, student, 2.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    over = temper(_top([[0, 1]], [[0.9, 0.3]]), 2.0)  # quantised values summing over 1: still a distribution
    assert over.log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-6)


def test_consensus_of_one_client_is_that_client():
    logits = torch.randn(7, 50, generator=torch.Generator().manual_seed(1))
    top = top_k_of(logits, 5)
    agreed = consensus([top], torch.ones(1), 50, 5)
    assert torch.equal(agreed.ids, top.ids)
    assert torch.allclose(agreed.logp, top.logp, atol=1e-5)


def test_consensus_is_the_weighted_mean_with_explicit_tails():
    """V = 5. A: {0: 0.7}, tail 0.3 -> 0.075 each; B: {1: 0.5}, tail 0.5 -> 0.125 each."""
    a, b = _top([[0]], [[0.7]]), _top([[1]], [[0.5]])
    even = consensus([a, b], torch.tensor([1.0, 1.0]), 5, 2)
    assert even.ids.tolist() == [[0, 1]]
    assert torch.allclose(even.logp.exp(), torch.tensor([[0.4125, 0.2875]]), atol=1e-6)
    assert 1 - even.logp.exp().sum() == pytest.approx(0.3, abs=1e-6)  # the three others: 0.1 each
    skewed = consensus([a, b], torch.tensor([3.0, 1.0]), 5, 1)  # (3 · 0.7 + 0.125) / 4
    assert skewed.ids.tolist() == [[0]] and skewed.logp.exp().item() == pytest.approx(0.55625, abs=1e-6)
    per_position = consensus([a, b], torch.tensor([[3.0], [1.0]]), 5, 1)  # (n, P) weights, one position
    assert torch.equal(per_position.ids, skewed.ids) and torch.allclose(per_position.logp, skewed.logp)


def test_consensus_does_not_depend_on_how_positions_are_chunked():
    gen = torch.Generator().manual_seed(2)
    tops = [top_k_of(torch.randn(40, 30, generator=gen), 4) for _ in range(3)]
    w = torch.rand(3, 40, generator=gen)
    one, many = consensus(tops, w, 30, 6, chunk=1), consensus(tops, w, 30, 6, chunk=256)
    assert torch.equal(one.ids, many.ids) and torch.equal(one.logp, many.logp)


@pytest.mark.parametrize(("vocab", "dtype"), [(200, torch.uint8), (256, torch.uint8), (260, torch.uint16)])
def test_ids_take_the_narrowest_integer_type(vocab, dtype):
    assert id_dtype(vocab) == dtype
    assert id_dtype(49152) == torch.uint16 and id_dtype(151_936) == torch.int32
