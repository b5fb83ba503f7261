"""Progress of a long report: a Rich progress bar on a terminal, plain lines elsewhere.

Each finished step prints its line either way (above the bar on a terminal), so a CI
log reads the same as before and a person at a terminal also sees how far the run is.
"""

from __future__ import annotations

import sys
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress as RichProgress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)


class Progress:
    """``with Progress(total) as progress: progress.start(label); ...; progress.done(line)``."""

    def __init__(self, total: int, *, live: bool | None = None) -> None:
        self.live = sys.stdout.isatty() if live is None else live
        self._bar: RichProgress | None = None
        self._task: TaskID | None = None
        self.total = total

    def __enter__(self) -> Progress:
        if self.live:
            self._bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=Console(),
                transient=True,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task("starting", total=self.total)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.__exit__(kind, error, trace)
            self._bar = None

    def start(self, label: str) -> None:
        """What runs now (the bar's description)."""
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, description=label)

    def say(self, text: str) -> None:
        """A line of output (above the bar on a terminal)."""
        if self._bar is not None:
            self._bar.console.print(text, markup=False, highlight=False)
        else:
            print(text, flush=True)

    def done(self, line: str, steps: int = 1) -> None:
        """``steps`` finished (one, or a cell that cannot run): a line, the bar moves on."""
        self.say(line)
        if self._bar is not None and self._task is not None:
            self._bar.advance(self._task, steps)
