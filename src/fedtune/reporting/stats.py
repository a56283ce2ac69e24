"""Means with 95% t-intervals over seeds, and rankings that never order what the noise cannot.

The interval is Student's t over the seeds' values (mean ± t₀.₉₇₅,ₙ₋₁ · s / √n). Two settings are
ordered only when their intervals do not overlap, even through a chain: overlapping ones share a tier.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

# t quantile at 0.975 by degrees of freedom (beyond 30: the normal's 1.96 is within 4%)
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131]
_T975 += [2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


@dataclass(frozen=True)
class Interval:
    mean: float
    half: float  # half-width of the 95% interval; 0 with one value
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half

    @property
    def high(self) -> float:
        return self.mean + self.half

    def overlaps(self, other: Interval) -> bool:
        return self.low <= other.high and other.low <= self.high

    def text(self, fmt: str = ".3f", scale: float = 1.0) -> str:
        """'1.234 ± 0.056', or the value alone with one seed."""
        m, h = self.mean * scale, self.half * scale
        return f"{m:{fmt}} ± {h:{fmt}}" if self.n > 1 else f"{m:{fmt}}"

    def as_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "half_width": self.half, "low": self.low, "high": self.high, "n": self.n}


def t975(df: int) -> float:
    return _T975[df - 1] if df <= len(_T975) else 1.96


def interval(values: Sequence[float]) -> Interval:
    """Mean and 95% t-interval of ``values`` (at least one)."""
    if not values:
        raise ValueError("an interval needs at least one value")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return Interval(mean, 0.0, 1)
    return Interval(mean, t975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values)), len(values))


def tiers(intervals: dict[str, Interval], lower_is_better: bool = True) -> list[list[str]] | None:
    """Names grouped best first, so that no name is ranked against one whose interval overlaps its own:
    overlapping intervals are merged into groups (chains included), and groups are disjoint ranges.
    None when any name has a single value (no interval, so no ranking)."""
    if not intervals or any(i.n < 2 for i in intervals.values()):
        return None
    groups: list[list[str]] = []
    reach = -math.inf
    for name in sorted(intervals, key=lambda k: (intervals[k].low, intervals[k].mean)):
        if groups and intervals[name].low <= reach:
            groups[-1].append(name)
        else:
            groups.append([name])
        reach = max(reach, intervals[name].high) if len(groups[-1]) > 1 else intervals[name].high
    groups = [sorted(g, key=lambda k: intervals[k].mean) for g in groups]
    return groups if lower_is_better else [list(reversed(g)) for g in reversed(groups)]
