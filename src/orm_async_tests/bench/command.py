"""``orm-async-tests bench [--quick] [--out DIR] [--concurrency 1 10]``.

Opens the project's database (the embedded PostgreSQL, migrated to head, or
``DATABASE_URL``, which must be migrated) exactly as the experiments do, runs
every cell with a progress bar on stderr, writes ``bench.json``, ``bench.md``
and one chart per operation group into ``--out`` (``bench-results/``), and
prints the medians and the geometric means. Exit status: 0 every cell checked
and timed, 1 a cell failed its check (it has no number; the report says why),
2 a setup problem (one line, through the CLI's usual error path).

The benchmark always talks asyncpg: with ``DB_DRIVER=psycopg`` (or a
``postgresql+psycopg://`` URL) its SQLAlchemy engines still use asyncpg, so the
four columns differ in the layer above the driver only.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from .. import migrations
from ..db import Target, open_database, resolve_target
from ..settings import Settings
from . import plots, report
from .stats import times
from .suite import BenchRun, group_count, run_bench

EXIT_OK, EXIT_FAILED = 0, 1


class ProgressBar:
    """A rich progress bar over the groups of cells; called with each group's label as it starts."""

    def __init__(self, total: int, console: Console) -> None:
        self.bar = Progress(
            SpinnerColumn(),
            TextColumn("{task.description:<40}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        self.task = self.bar.add_task("seeding the data", total=total)
        self.started = 0

    def __call__(self, label: str) -> None:
        if self.started:
            self.bar.advance(self.task)
        self.started += 1
        self.bar.update(self.task, description=label)

    def __enter__(self) -> ProgressBar:
        self.bar.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.bar.update(self.task, completed=self.started, description="done")
        self.bar.stop()


async def bench(args: argparse.Namespace, target_out: list[Target]) -> int:
    """The ``bench`` subcommand's body (run by the CLI's guarded event loop)."""
    settings = dataclasses.replace(Settings.from_env(), driver="asyncpg")
    target = resolve_target(settings)
    target_out.append(target)
    # piped output (a log, CI) gets a table wide enough for its columns, not 80
    out = Console() if sys.stdout.isatty() else Console(width=140)
    err = Console(stderr=True)
    async with open_database(settings, target=target) as db:
        await db.server_version()
        message = await migrations.prepare(db)
        if message:
            print(message)
        with ProgressBar(group_count(args.concurrency), err) as progress:
            run = await run_bench(
                db, quick=args.quick, concurrency=args.concurrency, progress=progress
            )
    paths = report.write(run, Path(args.out)) + plots.write(run, Path(args.out))
    show(run, out)
    out.print("Written: " + ", ".join(str(p) for p in paths))
    if run.failed:
        out.print(f"[bold red]{len(run.failed)} cell(s) failed[/], so they have no number:")
        for cell in run.failed:
            title = run.meta["operations"][cell.operation]["title"]
            label = run.meta["implementations"][cell.implementation]
            out.print(f"  {title} · {label} · concurrency {cell.concurrency}: {cell.error}")
        return EXIT_FAILED
    return EXIT_OK


def show(run: BenchRun, console: Console) -> None:
    table = Table(title=report.headline(run), title_justify="left", title_style="")
    labels = list(run.meta["implementations"].values())
    for name in ["operation", "c", *labels, "best/asyncpg", "best/naive"]:
        table.add_column(name, justify="left" if name == "operation" else "right")
    for row in report.short_table(run):
        table.add_row(*row)
    console.print(table)
    for level in run.concurrency:
        g = report.geomeans(run, level)
        console.print(
            f"geometric means, concurrency {level}: "
            + " · ".join(f"{report.RATIO_TITLES[n]} {times(g[n])}" for n in report.RATIOS)
        )
