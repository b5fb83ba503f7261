"""Command line: ``orm-async-tests list | run N... | run --all | bench``, and ``testN``.

``testN`` (``poetry run test1``) is :func:`orm_async_tests.lab.scripts.script`
of experiment N, reached as ``cli.testN`` (the console scripts in
pyproject.toml). Exit statuses are those of :mod:`orm_async_tests.lab.scripts`;
``bench`` (see :mod:`orm_async_tests.bench`) exits 1 when a benchmarked pattern
fails its check, and 2 when the optional ``bench`` dependency group is not
installed. Set ``ORM_ASYNC_TESTS_TRACEBACK=1`` to see the traceback of an
unexpected error.

Importing this module imports the standard library only: ``list`` and ``--help``
read the experiments' sources (:mod:`.lab.catalogue`); a run imports what it runs.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Callable, Sequence

from .bench import MAX_CONCURRENCY
from .lab.catalogue import catalogue
from .lab.scripts import (
    DRIVERS,
    EXIT_OK,
    EXIT_SETUP,
    add_driver_option,
    known_script,
    reader_may_leave,
    use_driver,
)

WIDTH = 100


@reader_may_leave
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="orm-async-tests",
        description="Run the async SQLAlchemy experiments and print what they observe.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="list the experiments, their questions and scenarios")
    run = commands.add_parser("run", help="run experiments by number, or all of them")
    run.add_argument("numbers", nargs="*", type=int, metavar="N")
    run.add_argument("--all", action="store_true", help="run every experiment")
    add_driver_option(run)
    report = commands.add_parser(
        "report",
        help="run every experiment (twice) and write findings/ and the README's summary",
        description="Run every experiment --runs times on one database; write "
        "findings.json and findings.md into --out and the experiments block of --readme. "
        "Figures are published as the interval over the runs.",
    )
    report.add_argument("--runs", type=int, default=2, metavar="N", help="(default: 2)")
    report.add_argument(
        "--driver",
        action="append",
        choices=DRIVERS,
        help="a driver to run the cells of (repeatable; default: asyncpg and psycopg)",
    )
    report.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="run nothing: merge the cells of these findings.json files (one per "
        "SQLAlchemy line, from `nox -s matrix`) into --out and --readme",
    )
    report.add_argument("--out", default="findings", metavar="DIR", help="(default: findings)")
    report.add_argument(
        "--readme", default="README.md", metavar="FILE", help="(default: README.md; '' for none)"
    )
    bench = commands.add_parser(
        "bench",
        help="benchmark async SQLAlchemy patterns beside raw drivers and other ORMs",
        description="Benchmark the naive and the fastest correct async SQLAlchemy patterns "
        "(Core and ORM, on asyncpg and psycopg) beside raw asyncpg, raw psycopg, Tortoise "
        "ORM and Piccolo on the same server and rows, on asyncio's loop and uvloop; writes "
        "JSON, Markdown and charts. Needs `poetry install --with bench`.",
    )
    bench.add_argument("--quick", action="store_true", help="a short run (smaller, fewer repeats)")
    bench.add_argument(
        "--loop",
        nargs="+",
        choices=("asyncio", "uvloop"),
        help="event loops to run on, each in turn (default: asyncio uvloop)",
    )
    bench.add_argument("--operations", nargs="+", metavar="OP", help="only these operations")
    bench.add_argument(
        "--implementations", nargs="+", metavar="IMPL", help="only these implementations"
    )
    bench.add_argument(
        "--repeat-check",
        action="store_true",
        help="run the cells twice (default: the primary-key reads) and show both medians",
    )
    bench.add_argument(
        "--compare",
        nargs=2,
        metavar="JSON",
        help="run nothing: compare two bench.json files (the run to publish, then its repeat)",
    )
    bench.add_argument(
        "--render",
        metavar="JSON",
        help="run nothing: write the Markdown and charts again from a bench.json's samples",
    )
    bench.add_argument(
        "--readme", default=None, metavar="FILE", help="with --compare: write FILE's bench block"
    )
    bench.add_argument(
        "--profile",
        action="store_true",
        help="break a primary-key read's cost down by layer, then time the attempts to "
        "close the gap (profile.md, attempts.md)",
    )
    bench.add_argument(
        "--out", default="bench-results", metavar="DIR", help="(default: bench-results)"
    )
    bench.add_argument(
        "--concurrency",
        nargs="+",
        type=int,
        default=[1, 10],
        metavar="N",
        help=f"tasks sharing the pool, one session each (default: 1 10; 1 to {MAX_CONCURRENCY})",
    )
    args = parser.parse_args(argv)
    if args.command == "run":
        use_driver(args.driver)
    if args.command == "bench":
        if any(not 1 <= n <= MAX_CONCURRENCY for n in args.concurrency):
            parser.error(f"--concurrency levels must be between 1 and {MAX_CONCURRENCY}")
        return _bench(args)
    if args.command == "report":
        if args.runs < 1:
            parser.error("--runs must be at least 1")
        return _report(args)
    found = catalogue()
    if args.command == "list":
        for entry in found.values():
            print(f"{entry.name:<7} {entry.title}")
            print(textwrap.indent(_wrap(entry.question, WIDTH - 8), " " * 8))
            for name, _ in entry.scenarios:
                print(f"{'':8}- {name}")
        return EXIT_OK
    if args.all == bool(args.numbers):
        parser.error("give experiment numbers or --all (not both)")
    unknown = [n for n in args.numbers if n not in found]
    if unknown:
        parser.error(f"no experiment {', '.join(map(str, unknown))}; try `orm-async-tests list`")
    from .lab.runner import Planned, run_guarded

    chosen = list(found.values()) if args.all else [found[n] for n in args.numbers]
    return run_guarded([Planned(entry.module) for entry in chosen])


def _report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .lab.runner import guarded, run_report

    readme = Path(args.readme) if args.readme else None
    if args.merge:
        from .lab.runner import ReportError, merge_reports

        command = "nox -s matrix"
        try:
            return merge_reports([Path(p) for p in args.merge], Path(args.out), readme, command)
        except ReportError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_SETUP
    drivers = list(dict.fromkeys(args.driver or DRIVERS))
    command = f"orm-async-tests report --runs {args.runs}"
    return guarded(
        lambda target: run_report(args.runs, Path(args.out), readme, command, target, drivers)
    )


def _bench(args: argparse.Namespace) -> int:
    from .bench import INSTALL_HINT, missing_modules

    if missing_modules():
        print(f"error: {INSTALL_HINT}", file=sys.stderr)
        return EXIT_SETUP
    from .bench.command import bench
    from .errors import SetupError

    try:
        return bench(args)
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_SETUP


def _wrap(text: str, width: int) -> str:
    return textwrap.fill(" ".join(text.split()), width)


def __getattr__(name: str) -> Callable[[], int]:
    """``cli.test1`` … : the console script of each experiment found in the package."""
    found = known_script(name)
    if found is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return found
