"""Statistics of a benchmark: medians with their range, ratios, geometric means.

A cell (implementation x operation x concurrency) gives one throughput sample
(operations per second) per timed repeat. We report the median (robust to the
odd slow repeat that a shared 2-core machine produces) with the minimum and
maximum, never a mean ± deviation over five samples. Implementations are
compared by the ratio of their medians, and across operations by the geometric
mean of those ratios (the only mean of ratios that does not depend on which
side is the numerator).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

TIMES = "\N{MULTIPLICATION SIGN}"
DASH = "\N{EN DASH}"


@dataclass(frozen=True)
class Summary:
    """Median, minimum and maximum of a cell's samples (operations per second)."""

    median: float
    low: float
    high: float
    samples: tuple[float, ...]

    def shown(self) -> str:
        """``12,300 (12,000–12,800)``: what the Markdown table prints."""  # noqa: RUF002
        return f"{number(self.median)} ({number(self.low)}{DASH}{number(self.high)})"


def summarize(samples: Sequence[float]) -> Summary:
    """The :class:`Summary` of at least one positive sample."""
    if not samples:
        raise ValueError("no samples to summarize")
    if any(not math.isfinite(s) or s <= 0 for s in samples):
        raise ValueError(f"samples must be positive and finite: {list(samples)}")
    return Summary(
        median=statistics.median(samples),
        low=min(samples),
        high=max(samples),
        samples=tuple(samples),
    )


def ratio(numerator: Summary | None, denominator: Summary | None) -> float | None:
    """``numerator.median / denominator.median``; ``None`` when either cell has no number."""
    if numerator is None or denominator is None:
        return None
    return numerator.median / denominator.median


def geomean(values: Iterable[float | None]) -> float | None:
    """Geometric mean of the ratios that exist; ``None`` when there are none."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    if any(v <= 0 for v in present):
        raise ValueError(f"a geometric mean needs positive values: {present}")
    return math.exp(math.fsum(math.log(v) for v in present) / len(present))


def number(value: float) -> str:
    """Three significant figures, thousands separated: ``16,700``, ``742``, ``9.86``, ``0.412``."""
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    if magnitude >= 2:
        return f"{round(value, 2 - magnitude):,.0f}"
    return f"{value:,.{2 - magnitude}f}"


def times(value: float | None) -> str:
    """A ratio as ``0.420×`` / ``3.10×``; ``–`` when it is missing."""  # noqa: RUF002
    if value is None:
        return DASH
    return f"{number(value)}{TIMES}"
