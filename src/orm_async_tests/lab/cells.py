"""Cells: the stack a run observes (driver, SQLAlchemy line, server), and the
expectations that differ between them.

A check whose expected value is not the same on every stack says so where it is
stated, once per cell it differs on::

    lab.check("the error class", "...",
              expected=on(asyncpg=prefix("InterfaceError"), psycopg=prefix("OperationalError")),
              observed=describe(err))
    lab.check("COPY through driver_connection", "...",
              expected=on(asyncpg=1000, psycopg=not_here("psycopg's AsyncConnection has no "
                                                          "copy_records_to_table")),
              observed=copied)

``on(...)`` takes the drivers (``asyncpg``, ``psycopg``) or the SQLAlchemy lines
(``sa20``, ``sa21``) as keywords, nested when both matter
(``on(asyncpg=on(sa20=x, sa21=y), psycopg=z)``); a key left out means "no
expectation was stated for it", and a run there fails with that reason, so a new
cell is never passed by default. ``not_here(reason)`` marks a check that means
nothing on that cell: it is reported SKIPPED with the reason, never as passed.
The observation is made on every cell; only the expectation is chosen.

Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .checks import Expect

DRIVERS = ("asyncpg", "psycopg")
LINES = ("sa20", "sa21")


@dataclass(frozen=True)
class Cell:
    """Where a run is observed: driver, SQLAlchemy line (``"2.1"``) and server kind."""

    driver: str
    line: str
    server: str = "embedded"

    @property
    def line_key(self) -> str:
        return "sa" + self.line.replace(".", "")

    def label(self) -> str:
        """``asyncpg · SA 2.1 · embedded``: how reports name the cell."""
        return f"{self.driver} · SA {self.line} · {self.server}"

    @property
    def key(self) -> str:
        """``asyncpg/2.1/embedded``: the cell's id in findings.json."""
        return f"{self.driver}/{self.line}/{self.server}"


@dataclass(frozen=True)
class NotHere:
    """``not_here(reason)``: the check means nothing on this cell."""

    reason: str


def not_here(reason: str) -> NotHere:
    if not reason.strip():
        raise ValueError("not_here() needs the reason the check means nothing on this cell")
    return NotHere(" ".join(reason.split()))


@dataclass(frozen=True)
class On:
    """An expectation per driver or per SQLAlchemy line (see the module docstring)."""

    by: str
    """``"driver"`` or ``"line"``."""
    cases: dict[str, Any]

    def pick(self, cell: Cell) -> Any:
        key = cell.driver if self.by == "driver" else cell.line_key
        if key not in self.cases:
            return NotStated(f"no expectation stated for {key}")
        found = self.cases[key]
        return found.pick(cell) if isinstance(found, On) else found

    def texts(self, shown: Any) -> dict[str, str]:
        """Every case as text (``"asyncpg"``, ``"psycopg · sa20"``, ...), for the report."""
        out: dict[str, str] = {}
        for key, value in self.cases.items():
            if isinstance(value, On):
                for inner, text in value.texts(shown).items():
                    out[f"{key} · {inner}"] = text
            elif isinstance(value, NotHere):
                out[key] = f"SKIPPED: {value.reason}"
            else:
                out[key] = shown(value)
        return out


@dataclass(frozen=True, repr=False)
class NotStated(Expect):
    """A cell the expectation names no value for: the check fails, saying so."""

    reason: str

    def text(self) -> str:
        return f"({self.reason})"

    def test(self, observed: Any) -> bool:
        return False


def on(**cases: Any) -> On:
    """An expectation that differs by driver (``asyncpg=``, ``psycopg=``) or by
    SQLAlchemy line (``sa20=``, ``sa21=``); values nest."""
    keys = set(cases)
    if not cases or not (keys <= set(DRIVERS) or keys <= set(LINES)):
        raise ValueError(
            f"on() takes drivers ({', '.join(DRIVERS)}) or SQLAlchemy lines "
            f"({', '.join(LINES)}), not {', '.join(sorted(keys)) or 'nothing'}"
        )
    return On("driver" if keys <= set(DRIVERS) else "line", dict(cases))


def resolve(expected: Any, cell: Cell, *, top: bool = True) -> Any:
    """The expectation for ``cell`` (``on`` picked, at any depth of a dict or list).
    ``not_here`` stands for the whole check: inside a dict or a list it is refused."""
    if isinstance(expected, On):
        found = resolve(expected.pick(cell), cell, top=top)
    elif isinstance(expected, dict):
        found = {k: resolve(v, cell, top=False) for k, v in expected.items()}
    elif isinstance(expected, list):
        found = [resolve(v, cell, top=False) for v in expected]
    else:
        found = expected
    if isinstance(found, NotHere) and not top:
        raise ValueError("not_here() stands for the whole check, not for one key or item")
    return found


def varies(expected: Any) -> bool:
    """Whether ``expected`` holds an :class:`On` anywhere."""
    if isinstance(expected, On):
        return True
    if isinstance(expected, dict):
        return any(varies(v) for v in expected.values())
    if isinstance(expected, list):
        return any(varies(v) for v in expected)
    return False
