"""``orm-async-tests bench``: run, check a repeat, compare two runs.

- ``bench [--quick] [--out DIR] [--concurrency 1 10] [--loop asyncio uvloop]
  [--operations …] [--implementations …]``: opens the project's database (the
  embedded PostgreSQL, migrated to head, or ``DATABASE_URL``, which must be
  migrated) exactly as the experiments do, runs every cell on each event loop in
  turn (a new loop each, from scratch), with a progress bar on stderr, writes
  ``bench.json``, ``bench.md`` and the charts into ``--out`` and prints the
  geometric means.
- ``bench --repeat-check`` runs the chosen cells (default: the two primary-key
  reads) twice, one run after the other, and shows each cell's two medians with
  their intervals: exit 1 when a cell's two intervals do not even overlap.
- ``bench --compare A.json B.json`` reads two runs and shows every geometric mean
  of both, and how far B is from A: exit 1 when one differs by more than 10 %.
  With ``--readme FILE`` it also writes the published summary into FILE's
  ``<!-- bench: … -->`` block, and ``reproduction.md`` into ``--out``.

Exit status: 0 every cell checked and timed, 1 a cell failed its check (it has no
number; the report says why), 2 a setup problem (one line, through the CLI's usual
error path).

The benchmark's own connection (seeding, checks) talks asyncpg; each implementation
brings its driver (the SQLAlchemy columns on psycopg: ``… (psycopg)``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

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

from ..db import Target
from ..lab.runner import guarded, ready_database
from . import plots, report, reproduce
from .stats import times
from .suite import BenchRun, group_count, merged, run_bench

EXIT_OK, EXIT_FAILED, EXIT_SETUP = 0, 1, 2
LOOPS = ("asyncio", "uvloop")
REPEAT_CHECK_OPERATIONS = ("get_by_pk", "get_narrow")


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """``None`` for asyncio's default loop, uvloop's constructor for ``uvloop``."""
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


class ProgressBar:
    """A rich progress bar over the groups of cells; called with each group's label as it
    starts. It appears with the first group (after the server answered), and says
    ``done`` at the end only if every run got that far: a setup error stays one line."""

    def __init__(self, total: int, console: Console) -> None:
        self.bar = Progress(
            SpinnerColumn(),
            TextColumn("{task.description:<52}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        self.task = self.bar.add_task("seeding the data", total=total)
        self.started = 0
        self.finished = False

    def __call__(self, label: str) -> None:
        if self.started:
            self.bar.advance(self.task)
        else:
            self.bar.start()
        self.started += 1
        self.bar.update(self.task, description=label)

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.started:
            return
        if self.finished:
            self.bar.update(self.task, completed=self.started, description="done")
        self.bar.stop()


def consoles() -> tuple[Console, Console]:
    # piped output (a log, CI) gets a table wide enough for its columns, not 80
    out = Console() if sys.stdout.isatty() else Console(width=160)
    return out, Console(stderr=True)


def measure(
    args: argparse.Namespace, loops: Sequence[str], progress: ProgressBar, operations: Sequence[str]
) -> BenchRun | int:
    """One run per event loop, merged; or the exit status of the loop that could not run."""
    runs: list[BenchRun] = []
    for loop in loops:

        async def one(target_out: list[Target], loop: str = loop) -> int:
            async with ready_database(target_out, driver="asyncpg") as (db, _):
                runs.append(
                    await run_bench(
                        db,
                        quick=args.quick,
                        concurrency=args.concurrency,
                        progress=progress,
                        loop=loop,
                        operations=operations or None,
                        implementations=args.implementations,
                    )
                )
            return EXIT_OK

        status = guarded(one, loop_factory(loop))
        if status != EXIT_OK:
            return status
    return merged(runs)


PROFILED = (("get_by_pk", 1), ("get_by_pk", 10), ("get_narrow", 10))
"""The (operation, concurrency) pairs ``--profile`` breaks down."""
PROFILE_OPS = 5_000


def profile(args: argparse.Namespace, console: Console) -> int:
    """``--profile``: where a primary-key read's microseconds go, then the attempts."""
    from . import attempts, profile as profiler
    from .runner import FULL_PLAN, QUICK_PLAN
    from .suite import chosen

    keys = ("asyncpg", "sqlalchemy_best", "sqlalchemy_orm", "sqlalchemy_naive")
    impls = [impl for key in keys for impl in chosen(None, [key])[1]]
    directory = Path(args.out)
    written: list[Path] = []

    async def main(target_out: list[Target]) -> int:
        async with ready_database(target_out, driver="asyncpg") as (db, _):
            runs = []
            for operation, level in PROFILED:
                console.print(f"profiling {operation} at concurrency {level} …")
                ops = PROFILE_OPS // 10 if args.quick else PROFILE_OPS
                runs.append(await profiler.run_profile(db, impls, operation, ops, level))
            written.extend(write_profiles(runs, directory))
            console.print("timing the attempts …")
            found = await attempts.run_attempts(
                db, args.concurrency, QUICK_PLAN if args.quick else FULL_PLAN
            )
            written.extend(attempts.write(found, directory))
        return EXIT_OK

    status = guarded(main)
    if written:
        console.print("Written: " + ", ".join(str(p) for p in written))
    return status


def write_profiles(runs: Sequence[Any], directory: Path) -> list[Path]:
    """One page (``profile.md``), one JSON (``profile.json``) and a chart per profile."""
    import json

    from . import profile as profiler

    directory.mkdir(parents=True, exist_ok=True)
    pages, charts = [], []
    for run in runs:
        name = f"profile-{run.meta['operation']}-c{run.meta['concurrency']}.png"
        charts.append(profiler.chart(run, directory / name))
        page = profiler.markdown(
            run, title=f"{run.meta['title']}, concurrency {run.meta['concurrency']}"
        )
        pages.append(page.replace("# ", "## ", 1) + f"\n![breakdown]({name})\n")
    md = directory / "profile.md"
    md.write_text("# Where the microseconds go\n\n" + "\n".join(pages), encoding="utf-8")
    data = directory / "profile.json"
    data.write_text(
        json.dumps([profiler.to_json(r) for r in runs], indent=2) + "\n", encoding="utf-8"
    )
    return [data, md, *charts]


def render(path: Path, directory: Path, console: Console) -> int:
    """``--render bench.json``: the Markdown and the charts again, from the run's samples."""
    import json

    from ..errors import SetupError
    from .suite import from_json

    try:
        run = from_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SetupError(f"cannot read a run from {path}: {type(exc).__name__}: {exc}") from exc
    analysis = report.analyse(run)
    paths = report.write(run, directory, analysis) + plots.write(run, directory)
    console.print("Written: " + ", ".join(str(p) for p in paths))
    return EXIT_FAILED if run.failed else EXIT_OK


def bench(args: argparse.Namespace) -> int:
    """The ``bench`` subcommand's body."""
    out, err = consoles()
    if args.profile:
        return profile(args, out)
    if args.render:
        return render(Path(args.render), Path(args.out), out)
    if args.compare:
        return reproduce.compare_files(
            [Path(p) for p in args.compare], Path(args.out), args.readme, out
        )
    loops = list(dict.fromkeys(args.loop or LOOPS))
    operations = list(args.operations or [])
    if args.repeat_check:
        operations = operations or list(REPEAT_CHECK_OPERATIONS)
        times_run = 2
    else:
        times_run = 1
    total = group_count(args.concurrency, len(loops) * times_run, operations or None)
    runs: list[BenchRun] = []
    with ProgressBar(total, err) as progress:
        for _ in range(times_run):
            found = measure(args, loops, progress, operations)
            if isinstance(found, int):
                return found
            runs.append(found)
        progress.finished = True
    if args.repeat_check:
        return reproduce.repeat_check(runs[0], runs[1], out)
    run = runs[0]
    analysis = report.analyse(run)
    paths = report.write(run, Path(args.out), analysis) + plots.write(run, Path(args.out))
    show(run, analysis, out)
    out.print("Written: " + ", ".join(str(p) for p in paths))
    if run.failed:
        out.print(f"[bold red]{len(run.failed)} cell(s) failed[/], so they have no number:")
        for cell in run.failed:
            title = run.meta["operations"][cell.operation]["title"]
            label = run.meta["implementations"][cell.implementation]
            out.print(
                f"  {title} · {label} · concurrency {cell.concurrency} · {cell.loop}: {cell.error}"
            )
        return EXIT_FAILED
    return EXIT_OK


def show(run: BenchRun, analysis: report.Analysis, console: Console) -> None:
    """Per loop and level, the headline ratios of every operation; then the geometric means."""
    console.print(report.headline(run))
    for loop in run.loops:
        for level in run.concurrency:
            ratios = analysis.ratios[loop][level]
            names = [n for n in report.TABLE_RATIOS if n in analysis.geomeans[loop][level]]
            table = Table(title=f"{loop}, concurrency {level}", title_justify="left")
            for name in ["operation", *(report.RATIOS[n].title for n in names)]:
                table.add_column(name, justify="left" if name == "operation" else "right")
            for op, info in run.meta["operations"].items():
                table.add_row(info["title"], *(times(ratios[op][n]) for n in names))
            g = analysis.geomeans[loop][level]
            table.add_row("geometric mean", *(times(g[n]) for n in names))
            console.print(table)
    for line in report.goal_lines(run, analysis):
        console.print(line)
