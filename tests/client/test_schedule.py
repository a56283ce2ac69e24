import itertools
import math

import pytest

from fedtune.client.schedule import lr_at


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


def test_constant():
    assert set(_run("constant", "federation")) == {1.0}


def test_unknown_schedule():
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_at(1.0, "step", 0.0, 0, 5, 1, 2)
