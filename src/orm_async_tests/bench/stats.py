"""Statistics of a benchmark: medians with 95 % intervals, ratios and geometric means with theirs.

A cell (implementation x operation x concurrency x event loop) gives one throughput
sample (operations per second) per timed round. We report:

- per cell, the **median** with a distribution-free 95 % confidence interval of the
  median (order statistics: the ``k``-th smallest and largest samples, ``k`` the
  largest rank for which a Binomial(n, 1/2) puts at most 2.5 % below it; with fewer
  than 6 samples no such rank exists and the interval is from the minimum to the maximum, which
  covers less than 95 %);
- per pair of cells, the **ratio of medians** with a 95 % *paired* bootstrap
  interval: the cells of one group are timed in interleaved rounds, so round ``r``
  of one implementation ran beside round ``r`` of the other; resampling whole
  rounds keeps a slow spell of the machine on both sides of the ratio;
- across operations, the **geometric mean** of the ratios (the only mean of ratios
  that does not depend on which side is the numerator), its interval from the same
  bootstrap, operations resampled independently (they ran at different times).

The bootstrap is seeded, so a report computed twice from the same samples is the
same.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

TIMES = "\N{MULTIPLICATION SIGN}"
DASH = "\N{EN DASH}"
CONFIDENCE = 0.95
BOOTSTRAP = 1000
"""Bootstrap resamples per interval."""
SEED = 12


@dataclass(frozen=True)
class Summary:
    """A cell's samples (operations per second): median and the 95 % interval of the median."""

    median: float
    low: float
    high: float
    samples: tuple[float, ...]

    @property
    def spread(self) -> float:
        """Half the interval's width relative to the median (0.05 = ±5 %)."""
        return (self.high - self.low) / 2 / self.median

    def shown(self) -> str:
        """``12,300 (12,000–12,800)``: what the Markdown table prints."""  # noqa: RUF002
        return f"{number(self.median)} ({number(self.low)}{DASH}{number(self.high)})"


@dataclass(frozen=True)
class Estimate:
    """A ratio or a geometric mean of ratios, with its 95 % bootstrap interval."""

    value: float
    low: float
    high: float

    def shown(self) -> str:
        """``0.620× (0.580–0.660)``."""  # noqa: RUF002
        return f"{times(self.value)} ({number(self.low)}{DASH}{number(self.high)})"


def median_rank(n: int, confidence: float = CONFIDENCE) -> int:
    """The 1-based rank ``k`` whose ``k``-th smallest and ``k``-th largest of ``n`` samples
    bound the median with at least ``confidence``; 1 (minimum, maximum) when none does."""
    tail = (1 - confidence) / 2
    below, k = 0.0, 0
    while k < n // 2:
        below += math.comb(n, k) / 2**n  # P(fewer than k+1 samples below the median)
        if below > tail:
            break
        k += 1
    return max(k, 1)


def summarize(samples: Sequence[float]) -> Summary:
    """The :class:`Summary` of at least one positive sample."""
    if not samples:
        raise ValueError("no samples to summarize")
    if any(not math.isfinite(s) or s <= 0 for s in samples):
        raise ValueError(f"samples must be positive and finite: {list(samples)}")
    ordered = sorted(samples)
    k = median_rank(len(ordered))
    return Summary(
        median=statistics.median(ordered),
        low=ordered[k - 1],
        high=ordered[-k],
        samples=tuple(samples),
    )


def _resample(values: Sequence[float], rng: random.Random) -> float:
    return statistics.median(rng.choices(values, k=len(values)))


def _paired(
    top: Sequence[float], bottom: Sequence[float], rng: random.Random, paired: bool = True
) -> float:
    """One bootstrap replicate of the ratio of medians: whole rounds resampled when the
    two were timed side by side (``paired``), else each side on its own."""
    if not paired or len(top) != len(bottom):
        return _resample(top, rng) / _resample(bottom, rng)
    rounds = rng.choices(range(len(top)), k=len(top))
    return statistics.median(top[r] for r in rounds) / statistics.median(bottom[r] for r in rounds)


def _interval(replicates: list[float]) -> tuple[float, float]:
    replicates.sort()
    tail = (1 - CONFIDENCE) / 2
    last = len(replicates) - 1
    return replicates[round(tail * last)], replicates[round((1 - tail) * last)]


def ratio(
    numerator: Summary | None, denominator: Summary | None, *, paired: bool = True
) -> Estimate | None:
    """``numerator.median / denominator.median`` with its interval; ``None`` when either
    cell has no number. ``paired=False`` for cells not timed in the same rounds."""
    if numerator is None or denominator is None:
        return None
    rng = random.Random(SEED)
    top, bottom = numerator.samples, denominator.samples
    low, high = _interval([_paired(top, bottom, rng, paired) for _ in range(BOOTSTRAP)])
    return Estimate(numerator.median / denominator.median, low, high)


def geomean_of(
    pairs: Iterable[tuple[Summary | None, Summary | None]], *, paired: bool = True
) -> Estimate | None:
    """Geometric mean over the pairs where both cells have a number, of the ratio of
    their medians, with its bootstrap interval; ``None`` when no pair has both."""
    present = [(a, b) for a, b in pairs if a is not None and b is not None]
    if not present:
        return None
    value = geomean(a.median / b.median for a, b in present)
    assert value is not None
    rng = random.Random(SEED)
    replicates = [
        math.exp(
            math.fsum(math.log(_paired(a.samples, b.samples, rng, paired)) for a, b in present)
            / len(present)
        )
        for _ in range(BOOTSTRAP)
    ]
    low, high = _interval(replicates)
    return Estimate(value, low, high)


def geomean(values: Iterable[float | None]) -> float | None:
    """Geometric mean of the values that exist; ``None`` when there are none."""
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


def times(value: float | Estimate | None) -> str:
    """A ratio as ``0.420×`` / ``3.10×``; ``–`` when it is missing."""  # noqa: RUF002
    if value is None:
        return DASH
    if isinstance(value, Estimate):
        value = value.value
    return f"{number(value)}{TIMES}"
