"""What every paradigm's server checks in a reply before it is used: its cost, its round and status, the parts it
decodes, its weight, an update's fit. Each failure is a BadReply whose text is the reason the client is dropped."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from fedtune.aggregation.clipping import not_finite
from fedtune.aggregation.weighting import WeightCap
from fedtune.paradigms.base import (
    BadReply,
    check_answered,
    check_cost,
    check_update,
    cost_metrics,
    decode_or_drop,
    update_problem,
    weight_or_drop,
)
from fedtune.wire.link import Link


@pytest.mark.parametrize(
    ("peak", "flops", "tokens", "why"),
    [
        (-1, 0.0, 0, "peak_bytes"),
        (True, 0.0, 0, "peak_bytes"),
        (1.5, 0.0, 0, "peak_bytes"),
        (0, math.nan, 0, "flops"),
        (0, -1.0, 0, "flops"),
        (0, 1e30, 0, "flops"),
        (0, 0.0, -5, "trained_tokens"),
        (0, 0.0, 2**60, "trained_tokens"),
        (0, 0.0, False, "trained_tokens"),
        (0, 0.0, 3.0, "trained_tokens"),
    ],
)
def test_an_implausible_cost_is_a_bad_reply_that_names_the_field(peak, flops, tokens, why):
    with pytest.raises(BadReply, match=why):
        check_cost(peak, flops, tokens)


def test_a_rounds_cost_is_the_largest_peak_and_the_summed_flops_and_tokens():
    check_cost(10, 1e9, 4096)
    assert cost_metrics([3, 9, 4], [1.0, 2.0, 3.5], [10, 20, 30]) == {
        "client_peak_bytes": 9,
        "client_flops": 6.5,
        "train_tokens": 60,
    }
    assert cost_metrics([], [], []) == {"client_peak_bytes": 0, "client_flops": 0.0, "train_tokens": 0}


def test_the_fused_finite_check_tells_overflow_from_nan():
    huge = {"a": torch.full((4,), 3e38), "b": torch.ones(2)}  # finite, but the squares overflow float32
    assert not_finite(huge) == [] and update_problem(huge, huge) is None
    assert "exceeds aggregation.max_update_norm" in update_problem(huge, huge, 1e30)
    bad = {"a": torch.ones(4), "b": torch.tensor([1.0, float("nan")]), "c": torch.tensor([float("-inf")])}
    assert not_finite(bad) == ["b", "c"] and update_problem(bad, bad) == "b: contains NaN or Inf"
    assert update_problem({"a": torch.ones(4)}, {"a": torch.ones(4)}, 1.9) == (
        "update norm 2 exceeds aggregation.max_update_norm=1.9"
    )


@dataclass(frozen=True)
class _Reply:
    round: int
    status: str = "ok"
    error: str | None = None


def test_a_reply_must_answer_its_round_and_report_success():
    check_answered(_Reply(3), 3)
    with pytest.raises(BadReply, match="stale reply for round 2"):
        check_answered(_Reply(2), 3)
    with pytest.raises(BadReply, match="diverged: non-finite loss"):
        check_answered(_Reply(3, "diverged", "non-finite loss"), 3)


def test_a_part_that_does_not_decode_drops_the_client_naming_the_part_and_codecs():
    link = Link.from_specs([{"name": "int8"}])
    like = {"w": torch.zeros(4, 3)}
    wire = link.encode({"w": torch.ones(4, 3)}, {}, torch.Generator())[0]
    assert torch.allclose(decode_or_drop(link, wire, like, "the update")["w"], torch.ones(4, 3), atol=1e-2)
    with pytest.raises(BadReply, match=r"cannot decode the update with codecs 'int8"):
        decode_or_drop(link, {**wire, "meta": torch.zeros(3, dtype=torch.uint8)}, like, "the update")
    with pytest.raises(BadReply, match="cannot decode the update"):
        decode_or_drop(link, wire, {"v": torch.zeros(4, 3), "w": torch.zeros(1)}, "the update")


def test_a_weight_outside_what_a_client_can_have_drops_it_and_the_cap_bounds_the_rest():
    cap = WeightCap(100, 8)
    assert weight_or_drop(10, 50, "examples", cap, "client 1") == 10.0
    assert weight_or_drop(10**9, 50, "examples", cap, "client 1") == 100.0  # counts as the cap
    assert weight_or_drop(0, 0, "uniform", cap, "client 1") == 1.0
    for examples in (0, -3):
        with pytest.raises(BadReply, match="must be a positive number"):
            weight_or_drop(examples, 50, "examples", cap, "client 1")


def test_an_update_that_does_not_fit_drops_the_client_with_the_reason():
    like = {"a": torch.zeros(2, 3)}
    check_update({"a": torch.ones(2, 3)}, like, max_norm=3.0)
    for delta, why in [
        ({"b": torch.ones(2, 3)}, "keys differ"),
        ({"a": torch.ones(3, 2)}, "shape"),
        ({"a": torch.ones(2, 3, dtype=torch.float64)}, "dtype"),
        ({"a": torch.full((2, 3), float("nan"))}, "NaN or Inf"),
        ({"a": torch.full((2, 3), 2.0)}, "exceeds aggregation.max_update_norm=3"),
    ]:
        with pytest.raises(BadReply, match=f"control variate: .*{why}"):
            check_update(delta, like, max_norm=3.0, what="control variate: ")


def test_evaluation_metrics_above_the_ceiling_drop_the_reply():
    """A client's metrics reach the summary's means: like every reported number, none may exceed 1e12."""
    from fedtune.paradigms.base import BadReply
    from fedtune.paradigms.evaluation import EvalReply, read_eval_reply

    read = read_eval_reply(3)
    assert read(0, EvalReply(3, {"loss": 2.5, "ppl": 12.2, "accuracy": 0.5})) == {
        "loss": 2.5,
        "ppl": 12.2,
        "accuracy": 0.5,
    }
    for metrics in ({"ppl": 1e300}, {"loss": 1e13}, {"accuracy": 1.5}, {"loss": -1.0}):
        with pytest.raises(BadReply, match="out of range"):
            read(0, EvalReply(3, metrics))
