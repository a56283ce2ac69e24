"""Intervals over seeds, and rankings that never order two settings whose intervals overlap."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedtune.reporting.stats import Interval, interval, t975, tiers


def test_interval_is_students_t():
    i = interval([1.0, 2.0, 3.0])
    assert i.mean == 2.0 and i.n == 3 and i.half == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    assert interval([5.0]) == Interval(5.0, 0.0, 1) and interval([5.0]).text() == "5.000"
    assert interval([1.0, 3.0]).text(".1f") == f"2.0 ± {12.706 * math.sqrt(2) / math.sqrt(2):.1f}"
    assert t975(1) == 12.706 and t975(29) == 2.045 and t975(1000) == 1.96
    with pytest.raises(ValueError):
        interval([])


def test_a_chain_of_overlaps_is_one_tier():
    a, b, c = Interval(1.0, 0.3, 3), Interval(1.5, 0.3, 3), Interval(2.0, 0.3, 3)  # a~b, b~c, not a~c
    d = Interval(5.0, 0.1, 3)
    assert tiers({"a": a, "b": b, "c": c, "d": d}) == [["a", "b", "c"], ["d"]]
    assert tiers({"a": a, "b": b, "c": c, "d": d}, lower_is_better=False) == [["d"], ["c", "b", "a"]]
    assert tiers({"a": a, "one seed": Interval(9.0, 0.0, 1)}) is None


@given(st.dictionaries(st.text(min_size=1, max_size=3), st.tuples(st.floats(-10, 10), st.floats(0, 3)), min_size=1))
def test_no_two_names_in_different_tiers_overlap(values):
    intervals = {k: Interval(m, h, 3) for k, (m, h) in values.items()}
    groups = tiers(intervals)
    assert sorted(k for g in groups for k in g) == sorted(intervals)
    for i, g in enumerate(groups):
        for later in groups[i + 1 :]:
            for x in g:
                for y in later:
                    assert not intervals[x].overlaps(intervals[y]) and intervals[x].high < intervals[y].low
