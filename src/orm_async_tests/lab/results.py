"""What a run of an experiment found: per scenario, its checks, figures and notes.

A skipped scenario is never counted as passed; a scenario that ran and made no
check fails the experiment, as does an error or a check that does not hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .checks import Check


@dataclass(frozen=True)
class Figure:
    """A measured value (a timing, a size, a rate): reported, never a pass/fail test."""

    label: str
    value: float
    unit: str

    def shown(self) -> str:
        if not math.isfinite(self.value):
            return f"{self.value} {self.unit}".rstrip()
        if self.unit == "s":
            return f"{self.value:.3f} s" if self.value < 10 else f"{self.value:.1f} s"
        if self.unit == "MiB":
            return f"{self.value:.2f} MiB"
        if self.unit in ("x", "ratio"):
            return f"{self.value:.2f}x"
        whole = self.value == int(self.value) or abs(self.value) >= 100
        number = f"{self.value:,.0f}" if whole else f"{self.value:,.2f}"
        return f"{number} {self.unit}".rstrip()


@dataclass
class ScenarioResult:
    name: str
    title: str
    doc: str
    checks: list[Check] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None
    """What the scenario raised (``describe``), if it raised."""
    traceback: str | None = field(default=None, repr=False)
    skipped: str | None = None
    """Why the scenario did not run here (``lab.skip``)."""

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed and c.skipped is None]

    @property
    def counted(self) -> list[Check]:
        """The checks that mean something on this cell (not skipped by ``not_here``)."""
        return [c for c in self.checks if c.skipped is None]

    @property
    def skip_reason(self) -> str | None:
        """Why the scenario was skipped (``lab.skip``), or why each of its checks was."""
        if self.skipped is not None:
            return self.skipped
        if self.checks and not self.counted:
            return "; ".join(dict.fromkeys(c.skipped or "" for c in self.checks))
        return None

    @property
    def status(self) -> str:
        """ERROR and FAILED before SKIPPED: a scenario that checked something and then
        skipped still answers for those checks."""
        if self.error is not None:
            return "ERROR"
        if self.failed:
            return "FAILED"
        if self.skipped is not None:
            return "SKIPPED"
        if self.checks and not self.counted:
            return "SKIPPED"
        return "PASSED" if self.checks else "NO CHECK"


@dataclass
class Result:
    experiment: str
    """``testN``."""
    title: str
    question: str
    sizes: dict[str, Any]
    scenarios: list[ScenarioResult] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None
    """What the cleanup after the scenarios raised, if it raised."""
    traceback: str | None = field(default=None, repr=False)
    cell: str = ""
    """The cell's label (``asyncpg · SA 2.1 · embedded``)."""

    @property
    def checks(self) -> list[Check]:
        return [c for s in self.scenarios for c in s.checks]

    @property
    def figures(self) -> list[Figure]:
        return [f for s in self.scenarios for f in s.figures]

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed and c.skipped is None]

    @property
    def counted(self) -> list[Check]:
        return [c for c in self.checks if c.skipped is None]

    @property
    def ran(self) -> list[ScenarioResult]:
        """The scenarios that ran here: not skipped, and not made only of checks that
        mean nothing on this cell."""
        return [s for s in self.scenarios if s.status != "SKIPPED"]

    @property
    def skipped_scenarios(self) -> list[ScenarioResult]:
        return [s for s in self.scenarios if s.status == "SKIPPED"]

    @property
    def skipped(self) -> str | None:
        """Why, when no scenario ran at all (the experiment cannot run here) and nothing
        was checked or went wrong on the way: only then is a skip the whole verdict."""
        if self.scenarios and not self.ran and not self.counted and not self.errors:
            return "; ".join(dict.fromkeys(s.skip_reason or "" for s in self.scenarios))
        return None

    @property
    def ok(self) -> bool:
        """Passed, or skipped as a whole: what exits 0."""
        return self.passed or self.skipped is not None

    @property
    def errors(self) -> list[str]:
        found = [f"{s.title}: {s.error}" for s in self.scenarios if s.error is not None]
        return found + ([self.error] if self.error is not None else [])

    @property
    def empty(self) -> list[ScenarioResult]:
        """Scenarios that ran to the end without making a check."""
        return [s for s in self.ran if s.error is None and not s.checks]

    @property
    def passed(self) -> bool:
        return bool(self.ran) and not self.errors and not self.empty and not self.failed

    def verdict(self) -> str:
        if self.skipped is not None:
            return f"SKIPPED: {self.skipped}"
        counted = self.counted
        held = f"{len(counted) - len(self.failed)}/{len(counted)} checks hold"
        not_here = len(self.checks) - len(counted)
        if not_here:
            held += f", {not_here} skipped on {self.cell or 'this cell'}"
        if self.errors:
            return f"ERROR: {self.errors[0]} (after {held})"
        if self.empty:
            names = ", ".join(repr(s.title) for s in self.empty)
            return f"FAILED: scenario {names} made no check ({held})"
        if self.failed:
            return f"FAILED: {held}"
        if not self.ran:
            return "FAILED: no scenario ran"
        skipped = "".join(f"; skipped {s.title!r}: {s.skip_reason}" for s in self.skipped_scenarios)
        return f"PASSED: {held}{skipped}"
