import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune.client.local_training import make_optimizer, optimizer_step
from fedtune.client.schedule import UpdateBound, adam_step_ratio, lr_at
from fedtune.config.training import TrainingConfig


def _run(schedule, scope, rounds=4, steps=5, warmup=0.0):
    return [
        lr_at(1.0, schedule, warmup, s, steps, r, rounds, scope) for r in range(1, rounds + 1) for s in range(steps)
    ]


def test_federation_scope_follows_global_step_across_rounds():
    lrs = _run("linear", "federation")
    assert all(a > b for a, b in itertools.pairwise(lrs))  # strictly decreasing over the whole run
    assert lrs[0] == 1.0 and lrs[-1] == pytest.approx(1 / 20)


def test_round_scope_restarts_each_round():
    lrs = _run("linear", "round")
    assert lrs[0] == lrs[5] == lrs[10] == 1.0


def test_cosine_and_warmup():
    lrs = _run("cosine", "federation", warmup=0.25)  # 20 steps, 5 of warmup
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert lrs[5] == 1.0 and lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 14 / 15)))


def test_by_round_scope_is_flowertunes_per_round_cosine():
    rounds, lo, hi = 10, 1e-6, 5e-5
    for r in range(1, rounds + 1):
        expected = lo + 0.5 * (hi - lo) * (1 + math.cos(math.pi * r / rounds))  # FlowerTune's cosine_annealing
        within = [lr_at(hi, "cosine", 0.0, s, 10, r, rounds, "by_round", lo) for s in range(10)]
        assert within == pytest.approx([expected] * 10)  # one rate through the round
    assert lr_at(hi, "cosine", 0.0, 0, 10, rounds, rounds, "by_round", lo) == pytest.approx(lo)


def test_decay_ends_at_lr_min():
    assert lr_at(1.0, "linear", 0.0, 19, 20, 1, 1, "federation", 0.1) == pytest.approx(0.1 + 0.9 / 20)
    with pytest.raises(ValueError, match="lr_min"):
        TrainingConfig(lr=1e-3, lr_min=1e-2)


def test_constant():
    assert set(_run("constant", "federation")) == {1.0}


def test_unknown_schedule():
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_at(1.0, "step", 0.0, 0, 5, 1, 2)


# ---- aggregation.max_update_norm=auto: what honest training can move ---------------------------------------


MAGNITUDES = st.sampled_from([0.0, 1e-12, 1e-6, 1e-3, 1.0, 1e3, 1e6, 1e12])


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    optimizer=st.sampled_from(["adamw", "sgd"]),
    steps=st.integers(1, 12),
    schedule=st.sampled_from(["constant", "linear", "cosine"]),
    warmup=st.sampled_from([0.0, 0.3]),
    weight_decay=st.sampled_from([0.0, 0.01, 0.5]),
    round_index=st.integers(1, 3),
    scales=st.lists(MAGNITUDES, min_size=12, max_size=12),
    seed=st.integers(0, 2**16),
)
def test_honest_training_never_moves_an_adapter_beyond_the_auto_bound(
    optimizer, steps, schedule, warmup, weight_decay, round_index, scales, seed
):
    """Whatever the gradients (tiny, huge, flipping, one coordinate at a time), the training the config
    describes moves the parameters by less than ``UpdateBound``: an honest update is never refused."""
    t = TrainingConfig(
        optimizer=optimizer,
        local_steps=steps,
        lr=1e-2,
        lr_schedule=schedule,
        warmup_ratio=warmup,
        weight_decay=weight_decay,
        max_grad_norm=1.0,
    )
    bound, why = UpdateBound.of(t, 3, 100)
    assert bound is not None, why
    g = torch.Generator().manual_seed(seed)
    start = torch.randn(50, generator=g)
    p = torch.nn.Parameter(start.clone())
    opt = make_optimizer(optimizer, [p], t.lr, weight_decay)
    for step in range(steps):
        grad = torch.randn(50, generator=g) * scales[step]
        if step % 3 == 2:
            grad = torch.zeros(50).index_fill_(0, torch.tensor([step]), scales[step])  # one coordinate
        p.grad = grad
        lr = bound.schedule.lr_at(round_index, step, steps)
        optimizer_step(opt, [p], lr, (), t.max_grad_norm)
    moved = float(torch.linalg.vector_norm(p.detach() - start))
    assert moved <= bound.on(round_index, {"p": start}), (moved, bound.on(round_index, {"p": start}))


def test_adams_step_ratio_is_one_at_first_and_bounded_after():
    assert adam_step_ratio(1) == pytest.approx(1.0)
    ratios = [adam_step_ratio(t) for t in range(1, 200)]
    assert all(a <= b + 1e-12 for a, b in itertools.pairwise(ratios)) and ratios[-1] < 8
    # the worst case it guards: silence, then one large gradient
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0, weight_decay=0.0)
    for t in range(1, 30):
        p.grad = torch.tensor([1e6 if t == 29 else 1e-9])
        before = float(p)
        opt.step()
        assert abs(float(p) - before) <= adam_step_ratio(t) + 1e-9


def test_sgd_without_clipping_or_with_dp_sgd_has_no_auto_bound():
    bound, why = UpdateBound.of(TrainingConfig(optimizer="sgd", max_grad_norm=None), 3, 100)
    assert bound is None and "max_grad_norm" in why
    bound, why = UpdateBound.of(TrainingConfig(optimizer="sgd"), 3, 100, dp_sgd=True)
    assert bound is None and "DP-SGD" in why


@settings(max_examples=100, deadline=None, derandomize=True)
@given(
    steps=st.integers(1, 12),
    schedule=st.sampled_from(["constant", "cosine"]),
    losses=st.lists(st.tuples(MAGNITUDES, MAGNITUDES), min_size=12, max_size=12),
    n=st.sampled_from([1, 7, 50, 4000]),
    seed=st.integers(0, 2**16),
)
def test_zeroth_order_training_never_moves_an_adapter_beyond_the_auto_bound(steps, schedule, losses, n, seed):
    """Whatever the two losses of each step, ZO-SGD with zo_clip stays within the auto bound."""
    from fedtune.client import zeroth_order as zo

    t = TrainingConfig(gradient="zeroth_order", local_steps=steps, lr=1e-2, lr_schedule=schedule, zo_clip=5.0)
    bound, why = UpdateBound.of(t, 3, 100)
    assert bound is not None, why
    start = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    p = start.clone()
    values = iter(v for pair in losses for v in pair)
    out = zo.train_zeroth_order(
        torch.nn.Identity(),
        [p],
        [
            {
                "labels": torch.ones(1, 3, dtype=torch.long),
                "input_ids": torch.ones(1, 3, dtype=torch.long),
                "attention_mask": torch.ones(1, 3, dtype=torch.long),
            }
        ]
        * steps,
        lambda s: bound.schedule.lr_at(2, s, steps),
        t.zo_eps,
        t.zo_clip,
        seed_of=lambda s: seed * 100 + s,
        loss=lambda model, batch: (torch.tensor(next(values)), 2),
    )
    moved = float(torch.linalg.vector_norm(p - start))
    assert out.result.steps == steps and moved <= bound.on(2, {"p": start})


def test_zeroth_order_without_a_clip_has_no_auto_bound():
    bound, why = UpdateBound.of(TrainingConfig(gradient="zeroth_order", zo_clip=None), 3, 100)
    assert bound is None and "zo_clip" in why
