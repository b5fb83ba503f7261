"""Checks: a claim, the value expected and the value observed, compared here.

An experiment states each fact once::

    lab.check("users committed", "Every user the loader committed is there once.",
              expected=users, observed=count)
    lab.check("the extra sessions time out", "...",
              expected={"TimeoutError": tasks - limit, "finished": limit, "other errors": []},
              observed={"TimeoutError": len(timeouts), "finished": done, "other errors": other})
    lab.check("the error names the lock", "...", expected=prefix("LockNotAvailable"),
              observed=describe(err))

``expected`` is a plain value (compared with ``==``), a comparator below, or a
``dict`` / ``list`` / ``tuple`` of those, compared key by key or item by item
(same keys, same length). A comparator's text and its test come from the same
value, so what the report shows as expected is exactly what was tested.
:func:`where` is the one hand-written test: its text states the rule, the
report marks it as such, and ``tests/test_lab.py`` proves it can fail.

This module imports nothing outside the standard library.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


class Expect:
    """A comparator: what an observed value must be, as text and as a test."""

    def text(self) -> str:
        raise NotImplementedError

    def test(self, observed: Any) -> bool:
        raise NotImplementedError

    def __str__(self) -> str:
        return self.text()

    def __repr__(self) -> str:
        return f"<expect {self.text()}>"


@dataclass(frozen=True, repr=False)
class _Bound(Expect):
    symbol: str
    limit: float
    holds: Callable[[float, float], bool]

    def text(self) -> str:
        return f"{self.symbol} {shown(self.limit)}"

    def test(self, observed: Any) -> bool:
        return _is_number(observed) and self.holds(observed, self.limit)


def at_least(limit: float) -> Expect:
    """``observed >= limit`` (a number, not a bool)."""
    return _Bound("≥", limit, lambda o, n: o >= n)


def at_most(limit: float) -> Expect:
    """``observed <= limit``."""
    return _Bound("≤", limit, lambda o, n: o <= n)


def more_than(limit: float) -> Expect:
    """``observed > limit``."""
    return _Bound(">", limit, lambda o, n: o > n)


def less_than(limit: float) -> Expect:
    """``observed < limit``."""
    return _Bound("<", limit, lambda o, n: o < n)


@dataclass(frozen=True, repr=False)
class _Between(Expect):
    low: float
    high: float

    def text(self) -> str:
        return f"{shown(self.low)} to {shown(self.high)}"

    def test(self, observed: Any) -> bool:
        return _is_number(observed) and self.low <= observed <= self.high


def between(low: float, high: float) -> Expect:
    """``low <= observed <= high``."""
    if low > high:
        raise ValueError(f"between({low}, {high}): the low bound is above the high one")
    return _Between(low, high)


@dataclass(frozen=True, repr=False)
class _Text(Expect):
    kind: str
    part: str

    def text(self) -> str:
        if self.kind == "prefix":
            return f"{self.part}…"
        if self.kind == "contains":
            return f"…{self.part}…"
        return f"matching /{self.part}/"

    def test(self, observed: Any) -> bool:
        if not isinstance(observed, str | BaseException):
            return False
        value = shown(observed)
        if self.kind == "prefix":
            return value.startswith(self.part)
        if self.kind == "contains":
            return self.part in value
        return re.search(self.part, value) is not None


def _text(kind: str, part: str) -> Expect:
    if not part:
        raise ValueError(f"{kind}('') accepts every text: say what the text must hold")
    return _Text(kind, part)


def prefix(start: str) -> Expect:
    """A text (or an exception, as ``"TypeName: message"``) that starts with ``start``."""
    return _text("prefix", start)


def contains(part: str) -> Expect:
    """A text (or an exception) with ``part`` in it."""
    return _text("contains", part)


def matches(pattern: str) -> Expect:
    """A text (or an exception) in which the regular expression ``pattern`` is found."""
    re.compile(pattern)
    return _text("matches", pattern)


@dataclass(frozen=True, repr=False)
class _OneOf(Expect):
    options: tuple[Any, ...]

    def text(self) -> str:
        return "one of: " + " | ".join(shown(o) for o in self.options)

    def test(self, observed: Any) -> bool:
        return any(agrees(o, observed) for o in self.options)


def one_of(*options: Any) -> Expect:
    """Any of ``options`` (values or comparators)."""
    if len(options) < 2:
        raise ValueError("one_of needs at least two options")
    return _OneOf(options)


@dataclass(frozen=True, repr=False)
class _Each(Expect):
    item: Any

    def text(self) -> str:
        return f"each (at least one): {shown(self.item)}"

    def test(self, observed: Any) -> bool:
        if isinstance(observed, str | bytes | Mapping) or not isinstance(observed, Sequence):
            return False
        return bool(observed) and all(agrees(self.item, o) for o in observed)


def each(item: Any) -> Expect:
    """A non-empty list whose every item agrees with ``item`` (an empty list fails:
    "all of nothing" would hold vacuously)."""
    return _Each(item)


@dataclass(frozen=True, repr=False)
class _Not(Expect):
    other: Any

    def text(self) -> str:
        return f"not {shown(self.other)}"

    def test(self, observed: Any) -> bool:
        if not isinstance(self.other, Expect) and not _same_kind(self.other, observed):
            return False
        return not agrees(self.other, observed)


def not_(other: Any) -> Expect:
    """Anything ``other`` does not accept; against a plain value, a value of the same kind
    (a number for a number, a text for a text) that differs: ``not_(pid)`` refuses
    ``None``, so a missing observation does not pass for a different one."""
    return _Not(other)


def _same_kind(a: Any, b: Any) -> bool:
    if _is_number(a) or _is_number(b):
        return _is_number(a) and _is_number(b)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return True
    return type(a) is type(b)


@dataclass(frozen=True, repr=False)
class _Where(Expect):
    rule: str
    predicate: Callable[[Any], bool]

    def text(self) -> str:
        return f"rule: {self.rule}"

    def test(self, observed: Any) -> bool:
        return bool(self.predicate(observed))


def where(rule: str, predicate: Callable[[Any], bool]) -> Expect:
    """A hand-written test, for when no comparator fits: ``rule`` says in words what
    ``predicate(observed)`` tests, and is what the report shows as expected."""
    if not rule.strip():
        raise ValueError("where() needs the rule in words")
    return _Where(rule, predicate)


def agrees(expected: Any, observed: Any) -> bool:
    """Whether ``observed`` is what ``expected`` asks for (see the module docstring)."""
    return not mismatches(expected, observed)


def mismatches(expected: Any, observed: Any, path: str = "") -> list[str]:
    """Where ``observed`` departs from ``expected``: ``"key: expected …, observed …"``."""
    where_ = f"{path}: " if path else ""
    if isinstance(expected, Expect):
        if expected.test(observed):
            return []
        return [f"{where_}expected {expected.text()}, observed {shown(observed)}"]
    if isinstance(expected, Mapping):
        if not isinstance(observed, Mapping):
            return [f"{where_}expected a mapping, observed {shown(observed)}"]
        found: list[str] = []
        for key in expected.keys() - observed.keys():
            found.append(f"{_join(path, key)}: missing")
        for key in observed.keys() - expected.keys():
            found.append(f"{_join(path, key)}: not expected (observed {shown(observed[key])})")
        for key in expected.keys() & observed.keys():
            found.extend(mismatches(expected[key], observed[key], _join(path, key)))
        return sorted(found)
    if isinstance(expected, list | tuple):
        # item by item, with the same rules (a bool is not a number, floats are close):
        # a list and a tuple of the same items agree
        if not isinstance(observed, list | tuple) or len(observed) != len(expected):
            return [f"{where_}expected {shown(expected)}, observed {shown(observed)}"]
        found = []
        for i, (e, o) in enumerate(zip(expected, observed, strict=True)):
            found.extend(mismatches(e, o, _join(path, f"[{i}]")))
        return found
    if isinstance(expected, float) or isinstance(observed, float):
        if _is_number(expected) and _is_number(observed) and math.isclose(expected, observed):
            return []
    elif expected == observed and (
        type(expected) is type(observed) or (_is_number(expected) and _is_number(observed))
    ):
        return []
    want, got = shown(expected), shown(observed)
    if want == got:  # alike in text: say what differs
        want, got = (
            f"{expected!r} ({type(expected).__name__})",
            f"{observed!r} ({type(observed).__name__})",
        )
    return [f"{where_}expected {want}, observed {got}"]


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path and not str(key).startswith("[") else f"{path}{key}"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def shown(value: Any) -> str:
    """How a value is written in a report: exceptions as ``"TypeName: first line"``,
    floats to 3 decimals, mappings as ``"key: value; ..."``."""
    if isinstance(value, Expect):
        return value.text()
    if isinstance(value, BaseException):
        from .outcomes import describe

        return describe(value)
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.3f}" if math.isfinite(value) and value != int(value) else f"{value:g}"
    if isinstance(value, Mapping):
        return "; ".join(f"{k}: {shown(v)}" for k, v in value.items()) or "{}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(shown(v) for v in value) + "]"
    if isinstance(value, set | frozenset):
        return "{" + ", ".join(sorted(shown(v) for v in value)) + "}"
    return str(value)


@dataclass(frozen=True)
class Check:
    """One recorded finding."""

    scenario: str
    name: str
    claim: str
    expected: str
    observed: str
    passed: bool
    differences: list[str] = field(default_factory=list)
    """Where the observation departs from the expectation (empty when it passed)."""
    rule: bool = False
    """The expectation is (or contains) a hand-written :func:`where` rule."""
    parts: list[tuple[str, str, str, bool]] = field(default_factory=list)
    """For a per-key expectation (a dict): (key, expected, observed, agrees) of each key."""
    skipped: str | None = None
    """Why the check means nothing on this cell (``not_here``): neither passed nor failed."""
    per_cell: dict[str, str] = field(default_factory=dict)
    """When the expectation differs by driver or SQLAlchemy line (``on``): each case's text."""

    @property
    def verdict(self) -> str:
        if self.skipped is not None:
            return "SKIP"
        return "PASS" if self.passed else "FAIL"


def make_check(scenario: str, name: str, claim: str, expected: Any, observed: Any) -> Check:
    found = mismatches(expected, observed)
    parts: list[tuple[str, str, str, bool]] = []
    if isinstance(expected, Mapping) and isinstance(observed, Mapping):
        for key in [*expected, *(k for k in observed if k not in expected)]:
            want = shown(expected[key]) if key in expected else "(not expected)"
            got = shown(observed[key]) if key in observed else "(missing)"
            ok = key in expected and key in observed and agrees(expected[key], observed[key])
            parts.append((str(key), want, got, ok))
    return Check(
        scenario,
        name,
        " ".join(claim.split()),
        shown(expected),
        shown(observed),
        not found,
        found,
        _has_rule(expected),
        parts,
    )


def _has_rule(expected: Any) -> bool:
    if isinstance(expected, _Where):
        return True
    if isinstance(expected, _OneOf):
        return any(_has_rule(o) for o in expected.options)
    if isinstance(expected, _Each | _Not):
        return _has_rule(expected.item if isinstance(expected, _Each) else expected.other)
    if isinstance(expected, Mapping):
        return any(_has_rule(v) for v in expected.values())
    if isinstance(expected, list | tuple):
        return any(_has_rule(v) for v in expected)
    return False
