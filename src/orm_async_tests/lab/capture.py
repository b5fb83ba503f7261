"""What Python warns and SQLAlchemy logs while a block runs, garbage collection included.

SQLAlchemy reports a connection it finds only when an object is garbage
collected (a leaked session, a pool from a dead event loop) twice: as a warning
(``SAWarning``, an error under pytest) and as a log record. :func:`captured`
records both around a block and, unless told otherwise, runs ``gc.collect()``
at its end, so that what the block left behind is collected (and reported)
there rather than later, elsewhere.
"""

from __future__ import annotations

import gc
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class Captured:
    """The warnings and log records of one :func:`captured` block (filled while it runs)."""

    caught: list[warnings.WarningMessage] = field(default_factory=list)
    """Every warning, as ``warnings.catch_warnings(record=True)`` keeps it."""
    records: list[logging.LogRecord] = field(default_factory=list)
    """The log records at or above the level asked for."""
    logged: list[str] = field(default_factory=list)
    """Their messages, formatted when they were logged."""

    def warning_lines(self, cut: str | None = None) -> list[str]:
        """``"SAWarning: message"`` for each warning; with ``cut``, each message ends
        before the first ``cut`` in it (e.g. ``" <"``: without object reprs)."""
        lines = []
        for w in self.caught:
            message = str(w.message)
            lines.append(
                f"{w.category.__name__}: {message if cut is None else message.split(cut)[0]}"
            )
        return lines


class _Recorder(logging.Handler):
    def __init__(self, level: int, box: Captured) -> None:
        super().__init__(level)
        self.box = box

    def emit(self, record: logging.LogRecord) -> None:
        self.box.records.append(record)
        self.box.logged.append(record.getMessage())


@contextmanager
def captured(
    logger: str = "sqlalchemy.pool", level: int = logging.WARNING, *, collect: bool = True
) -> Iterator[Captured]:
    """``with captured() as got:`` records every warning (all shown, none filtered out)
    and the records of ``logger`` at ``level`` or above until the block ends; with
    ``collect``, ``gc.collect()`` runs as the block's last step, still recorded.

    Garbage from before the block (an earlier experiment's or test's objects, whose
    ``__del__`` may warn) is not the block's: ``gc.collect()`` runs first, unrecorded."""
    gc.collect()
    box = Captured()
    handler = _Recorder(level, box)
    log = logging.getLogger(logger)
    was = log.level
    if log.getEffectiveLevel() > level:
        log.setLevel(level)  # else the logger drops the records before the handler sees them
    log.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            box.caught = caught
            try:
                yield box
            finally:
                if collect:
                    gc.collect()
    finally:
        log.removeHandler(handler)
        log.setLevel(was)


@contextmanager
def manual_gc() -> Iterator[None]:
    """No automatic garbage collection inside the block (explicit ``gc.collect()`` still
    works): what a leaked object's collection does then happens where an experiment
    collects, not at whatever allocation happens to trigger a collection."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
