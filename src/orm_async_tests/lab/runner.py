"""Run experiments on the project's database and print their reports.

The database is opened once per command and made ready (the embedded default
is migrated to head; another server must already be); then each planned
experiment is imported, run and reported. A setup problem (a malformed URL,
an unreachable server, an unmigrated schema) becomes one line and exit status
2; what an experiment raises is its own ERROR verdict.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import platform
import sys
import traceback
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import date
from importlib.metadata import version
from pathlib import Path
from typing import Any

from .. import migrations
from ..db import Database, Target, open_database, resolve_target
from ..errors import SetupError, explain, first_line
from ..settings import Settings, redacted
from .catalogue import catalogue
from .progress import Progress
from .registry import BadSizes, load
from .report import format_report
from .results import Result
from .scripts import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_SETUP

TRACEBACK_VARIABLE = "ORM_ASYNC_TESTS_TRACEBACK"


class ReportError(RuntimeError):
    """The report cannot read or write its files (one line, exit status 2)."""


@dataclass(frozen=True)
class Planned:
    """One experiment to run: its module, size overrides, and the scenarios (all: None)."""

    module: str
    sizes: dict[str, Any] = field(default_factory=dict)
    only: Sequence[str] | None = None


def run_guarded(plan: Sequence[Planned]) -> int:
    """Run the plan in a new event loop and print each report; the exit status."""
    return guarded(lambda target: run_plan(plan, target))


def guarded(
    main: Callable[[list[Target]], Coroutine[Any, Any, int]],
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
) -> int:
    """Run ``main`` in a new event loop (``loop_factory``'s: uvloop's, say); a setup
    error becomes one line and exit status 2.

    ``main`` appends the :class:`Target` it resolved, so the line can name the server.
    """
    target: list[Target] = []
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(main(target))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        raise  # the reader left (`| head`): scripts.reader_may_leave ends quietly
    except (BadSizes, ReportError, SetupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_SETUP
    except Exception as exc:
        line = explain(exc, target[0] if target else None)
        if line is None:
            if os.environ.get(TRACEBACK_VARIABLE):
                traceback.print_exc()
            line = f"unexpected {type(exc).__name__}: {first_line(exc)}"
            line += f" ({TRACEBACK_VARIABLE}=1 shows the traceback)"
        print(f"error: {line}", file=sys.stderr)
        return EXIT_SETUP


@asynccontextmanager
async def ready_database(
    target_out: list[Target] | None, *, driver: str | None = None
) -> AsyncIterator[tuple[Database, str]]:
    """The project's database from the environment, made ready (the embedded default
    migrated to head; another server checked), and the line that names it and the
    versions; ``target_out`` gets the target first, so a setup error can name it."""
    settings = Settings.from_env()
    if driver is not None:
        settings = dataclasses.replace(settings, driver=driver)
    target = resolve_target(settings)
    if target_out is not None:
        target_out.append(target)
    async with open_database(settings, target=target) as db:
        server = await db.server_version()
        message = await migrations.prepare(db)
        if message:
            print(message)
        yield db, database_line(db, server)


async def run_plan(plan: Sequence[Planned], target_out: list[Target] | None = None) -> int:
    """Open the database once, make it ready, run each experiment and print its report.

    The experiments are imported and their sizes checked first: sizes that do not fit
    (:class:`BadSizes`) are refused before any connection is made.
    """
    experiments = [load(planned.module) for planned in plan]
    for experiment, planned in zip(experiments, plan, strict=True):
        experiment.make_sizes(planned.sizes)
    async with ready_database(target_out) as (db, where):
        failures = 0
        for experiment, planned in zip(experiments, plan, strict=True):
            result = await experiment.run(db, planned.sizes, only=planned.only)
            show = bool(os.environ.get(TRACEBACK_VARIABLE))
            print(format_report(result, where, with_traceback=show), flush=True)
            failures += not result.ok
    return EXIT_FAILED if failures else EXIT_OK


async def run_report(
    runs: int,
    out: Path,
    readme: Path | None,
    command: str,
    target_out: list[Target],
    drivers: Sequence[str],
) -> int:
    """Every experiment ``runs`` times on each cell it can reach: each of ``drivers`` with
    the installed SQLAlchemy on the one server; findings.json, findings.md and the README's
    block (see :mod:`.findings`). A driver that is not installed is a cell that cannot
    run. Exit status 1 if any check failed in any run."""
    from importlib.util import find_spec

    from ..compat import LINE
    from .cells import Cell
    from .findings import Versions, cannot_run, collect, collect_cell

    if readme is not None:
        check_readme(readme)
    plan = [Planned(entry.module) for entry in catalogue().values()]
    experiments = [load(planned.module) for planned in plan]
    cells: list[dict[str, Any]] = []
    failed = False
    with Progress(len(drivers) * runs * len(experiments)) as progress:
        for driver in drivers:
            if find_spec(driver) is None:
                server = "external" if os.environ.get("DATABASE_URL") else "embedded"
                cell = Cell(driver, LINE, server)
                cells.append(cannot_run(cell.key, cell.label(), f"{driver} is not installed"))
                progress.done(
                    f"{cell.label()}: cannot run ({driver} is not installed)",
                    runs * len(experiments),
                )
                continue
            async with ready_database(target_out, driver=driver) as (db, where):
                server_version = await db.server_version()
                cell = Cell(driver, LINE, "embedded" if db.target.embedded else "external")
                done: list[list[tuple[int, Result]]] = []
                for run in range(1, runs + 1):
                    results = []
                    for experiment in experiments:
                        step = f"{cell.label()} run {run}/{runs} {experiment.name}"
                        progress.start(step)
                        result = await experiment.run(db)
                        results.append((experiment.number, result))
                        progress.done(f"{step}: {result.verdict()}")
                        if not result.ok:
                            failed = True
                            progress.say(format_report(result, where, with_traceback=True))
                    done.append(results)
            settings = db.settings
            versions = Versions(
                python=platform.python_version(),
                sqlalchemy=version("sqlalchemy"),
                driver=f"{driver} {version(driver)}",
                postgresql=server_version,
                server=cell.server,
                pgbouncer="not configured"
                if settings.pgbouncer_url is None
                else redacted(settings.pgbouncer_url),
            )
            cells.append(collect_cell(cell.key, cell.label(), done, versions))
    data = collect(cells, runs, command, date.today().isoformat())
    write_findings(data, out, readme)
    return EXIT_FAILED if failed else EXIT_OK


def merge_reports(sources: Sequence[Path], out: Path, readme: Path | None, command: str) -> int:
    """Merge the findings.json of several reports (one per SQLAlchemy line) into ``out``."""
    import json

    from .findings import merge

    if readme is not None:
        check_readme(readme)
    try:
        documents = [json.loads(path.read_text()) for path in sources]
    except (OSError, ValueError) as exc:
        raise ReportError(f"cannot read the findings to merge: {exc}") from None
    servers = {cell["key"].split("/")[-1] for doc in documents for cell in doc["cells"]}
    if len(servers) > 1:
        command = f"{command} on each server ({', '.join(sorted(servers))}), merged"
    data = merge(documents, command, date.today().isoformat())
    write_findings(data, out, readme)
    failed = [
        f"{cell['label']} {exp['name']}"
        for cell in data["cells"]
        for exp in cell["experiments"]
        if not all(v.startswith(("PASSED", "SKIPPED")) for v in exp["verdicts"])
    ]
    for where in failed:
        print(f"not passed: {where}")
    return EXIT_FAILED if failed else EXIT_OK


def write_findings(data: dict[str, Any], out: Path, readme: Path | None) -> None:
    from .findings import write

    try:
        written = write(data, out, readme)
    except OSError as exc:
        raise ReportError(f"cannot write the findings into {out}: {exc}") from None
    for path in written:
        print(f"wrote {path}")


def check_readme(readme: Path) -> None:
    """Before any run: the README exists and has the block the report writes."""
    from .findings import replace_block

    try:
        replace_block(readme.read_text(), "")
    except (OSError, ValueError) as exc:
        raise ReportError(f"cannot update {readme}: {exc}") from None


def database_line(db: Database, server_version: str) -> str:
    """``embedded PostgreSQL in … · PostgreSQL 18.6 · SQLAlchemy 2.1.9 · asyncpg 0.32.0``."""
    driver = db.target.url.get_driver_name()
    return (
        f"{db.describe()} · PostgreSQL {server_version} · SQLAlchemy "
        f"{version('sqlalchemy')} · {driver} {version(driver)}"
    )
