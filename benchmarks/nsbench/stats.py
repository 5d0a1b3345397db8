"""Medians and spreads, without numpy: the harness runs in the project's venv as is."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile with linear interpolation (numpy's default), of a non-empty sequence."""
    if not values:
        raise ValueError("quantile of no values")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Summary:
    """Median and the p10-p90 band of some samples; ``n`` says how many there were."""

    median: float
    p10: float
    p90: float
    n: int

    def scaled(self, factor: float) -> Summary:
        return Summary(self.median * factor, self.p10 * factor, self.p90 * factor, self.n)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def text(self, fmt: str = ".2f") -> str:
        """``12.34 [11.90-13.02]``: the median, then p10-p90."""
        if self.n == 1:
            return f"{self.median:{fmt}}"
        return f"{self.median:{fmt}} [{self.p10:{fmt}}-{self.p90:{fmt}}]"


def summarize(values: Sequence[float]) -> Summary:
    return Summary(quantile(values, 0.5), quantile(values, 0.1), quantile(values, 0.9), len(values))


def intervals(stamps: Sequence[float]) -> list[float]:
    """Differences of consecutive timestamps: the time each test took, end to end."""
    return [b - a for a, b in itertools.pairwise(stamps)]
