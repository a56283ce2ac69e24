"""What every paradigm's server checks in a reply's reported cost before it reaches the metrics."""

from __future__ import annotations

import math

import pytest

from fedtune.paradigms.base import BadReply, check_cost, cost_metrics


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
