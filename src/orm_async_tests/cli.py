"""Command line: ``orm-async-tests list | run N... | run --all | bench`` and ``poetry run testN``.

Exit status: 0 when every check of every experiment run holds, 1 when one
does not (or an experiment raised, or made no check), 2 when the database
setup is wrong (one line says what and what to do), 130 on Ctrl-C, 141 when
the reader of standard output went away (``| head``), as for a tool killed by SIGPIPE.
Set ``ORM_ASYNC_TESTS_TRACEBACK=1`` to see the traceback of an unexpected error.
``bench`` (see :mod:`orm_async_tests.bench`) exits 1 when a benchmarked pattern fails
its check, and 2 when the optional ``bench`` dependency group is not installed.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import pkgutil
import re
import sys
import textwrap
import traceback
from collections.abc import Callable, Coroutine, Sequence
from functools import wraps
from importlib.metadata import version
from typing import Any, ParamSpec

from . import migrations
from .bench import MAX_CONCURRENCY
from .db import Database, Target, open_database, resolve_target
from .errors import explain
from .harness import REGISTRY, Experiment, Result, first_line
from .settings import Settings

WIDTH = 100
EXIT_OK, EXIT_FAILED, EXIT_SETUP, EXIT_INTERRUPTED, EXIT_PIPE_CLOSED = 0, 1, 2, 130, 141
P = ParamSpec("P")


def reader_may_leave(command: Callable[P, int]) -> Callable[P, int]:
    """Let ``orm-async-tests list | head`` end quietly instead of with a BrokenPipeError."""

    @wraps(command)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> int:
        try:
            status = command(*args, **kwargs)
            sys.stdout.flush()
        except BrokenPipeError:
            # Python flushes stdout again at exit: point it at /dev/null first.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_PIPE_CLOSED
        return status

    return guarded


def discover() -> dict[int, Experiment]:
    """Import every ``testN_*`` module of the package; each registers its experiment."""
    package = importlib.import_module(__package__ or "orm_async_tests")
    for module in pkgutil.iter_modules(package.__path__):
        if re.fullmatch(r"test\d+_\w+", module.name):
            importlib.import_module(f"{package.__name__}.{module.name}")
    return dict(sorted(REGISTRY.items()))


@reader_may_leave
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="orm-async-tests",
        description="Run the async SQLAlchemy experiments and print what they observe.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="list the experiments and their questions")
    run = commands.add_parser("run", help="run experiments by number, or all of them")
    run.add_argument("numbers", nargs="*", type=int, metavar="N")
    run.add_argument("--all", action="store_true", help="run every experiment")
    bench = commands.add_parser(
        "bench",
        help="benchmark async SQLAlchemy patterns beside raw asyncpg and Tortoise ORM",
        description="Benchmark the naive and the fastest correct async SQLAlchemy patterns "
        "beside raw asyncpg and Tortoise ORM on the same server and rows; writes JSON, "
        "Markdown and charts. Needs `poetry install --with bench`.",
    )
    bench.add_argument("--quick", action="store_true", help="a short run (smaller, fewer repeats)")
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
    if args.command == "bench":
        if any(not 1 <= n <= MAX_CONCURRENCY for n in args.concurrency):
            parser.error(f"--concurrency levels must be between 1 and {MAX_CONCURRENCY}")
        return _bench(args)
    found = discover()
    if args.command == "list":
        for exp in found.values():
            print(f"{exp.name:<7} {exp.title}")
            print(textwrap.indent(_wrap(exp.question, WIDTH - 8), " " * 8))
        return EXIT_OK
    if args.all == bool(args.numbers):
        parser.error("give experiment numbers or --all (not both)")
    unknown = [n for n in args.numbers if n not in found]
    if unknown:
        parser.error(f"no experiment {', '.join(map(str, unknown))}; try `orm-async-tests list`")
    chosen = list(found.values()) if args.all else [found[n] for n in args.numbers]
    return _guarded([(exp, {}) for exp in chosen])


@reader_may_leave
def run_one(exp: Experiment, argv: Sequence[str] | None = None) -> int:
    """``poetry run testN [--size value ...]``: its parameters become options."""
    parser = argparse.ArgumentParser(
        prog=exp.name,
        description=f"{exp.title}. {exp.question}",
        epilog="Database: DATABASE_URL, or the embedded PostgreSQL when unset.",
    )
    for name, default in exp.params.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=type(default),
            default=default,
            help=f"(default: {default})",
        )
    args = parser.parse_args(argv)
    return _guarded([(exp, vars(args))])


def _bench(args: argparse.Namespace) -> int:
    from .bench import INSTALL_HINT, missing_modules

    if missing_modules():
        print(f"error: {INSTALL_HINT}", file=sys.stderr)
        return EXIT_SETUP
    from .bench.command import bench

    return _guarded_run(lambda target: bench(args, target))


def _guarded(plan: list[tuple[Experiment, dict[str, Any]]]) -> int:
    return _guarded_run(lambda target: run_experiments(plan, target))


def _guarded_run(main: Callable[[list[Target]], Coroutine[Any, Any, int]]) -> int:
    """Run ``main`` in a new event loop; a setup error becomes one line and exit status 2.

    ``main`` appends the :class:`Target` it resolved, so the line can name the server.
    """
    target: list[Target] = []
    try:
        return asyncio.run(main(target))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        line = explain(exc, target[0] if target else None)
        if line is None:
            if os.environ.get("ORM_ASYNC_TESTS_TRACEBACK"):
                traceback.print_exc()
            line = f"unexpected {type(exc).__name__}: {first_line(exc)}"
            line += " (ORM_ASYNC_TESTS_TRACEBACK=1 shows the traceback)"
        print(f"error: {line}", file=sys.stderr)
        return EXIT_SETUP


async def run_experiments(
    plan: list[tuple[Experiment, dict[str, Any]]], target_out: list[Target] | None = None
) -> int:
    """Open the database once, make it ready, run each experiment and print its report."""
    settings = Settings.from_env()
    target = resolve_target(settings)
    if target_out is not None:
        target_out.append(target)
    async with open_database(settings, target=target) as db:
        server = await db.server_version()
        message = await migrations.prepare(db)
        if message:
            print(message)
        failures = 0
        for exp, params in plan:
            # setup problems surfaced above (server_version, prepare); what an experiment
            # raises is its own ERROR verdict, even a TimeoutError of its own making
            result = await exp.run(db, **params)
            show = bool(os.environ.get("ORM_ASYNC_TESTS_TRACEBACK"))
            print(format_report(result, db, server, with_traceback=show))
            failures += not (result.passed or result.skipped)
    return EXIT_FAILED if failures else EXIT_OK


def format_report(
    result: Result, db: Database, server_version: str, *, with_traceback: bool = False
) -> str:
    exp = result.experiment
    out: list[str] = []
    head = f"══ {exp.name} · {exp.title} "
    out.append(head + "═" * max(0, WIDTH - len(head)))
    out.append(_labelled("Question", exp.question))
    driver = db.target.url.get_driver_name()
    out.append(
        _labelled(
            "Database",
            f"{db.describe()} · PostgreSQL {server_version} · SQLAlchemy "
            f"{version('sqlalchemy')} · {driver} {version(driver)}",
        )
    )
    if result.params:
        shown = " ".join(f"{k}={v}" for k, v in result.params.items())
        out.append(_labelled("Sizes", shown))
    out.append("")
    if result.checks:
        rows = [
            [str(i), c.name, c.expected, c.observed, "PASS" if c.passed else "FAIL"]
            for i, c in enumerate(result.checks, 1)
        ]
        out.extend(_table(["#", "check", "expected", "observed", "verdict"], rows))
        out.append("")
        out.append("What each check claims:")
        for i, c in enumerate(result.checks, 1):
            out.append(_hanging(f"{i}. ", c.claim))
    if result.figures:
        out.append("")
        out.append("Measured:")
        width = max(len(f.label) for f in result.figures)
        for f in result.figures:
            out.append(f"  {f.label:<{width}}  {f.shown()}")
    if result.notes:
        out.append("")
        out.append("Notes:")
        for note in result.notes:
            out.append(_hanging("- ", note))
    if with_traceback and result.traceback:
        out.append("")
        out.append(result.traceback.rstrip())
    out.append("")
    out.append(f"{result.verdict()} ({result.seconds:.2f} s)")
    out.append("")
    return "\n".join(out)


def _labelled(label: str, text: str) -> str:
    pad = 10
    body = _wrap(text, WIDTH - pad)
    return textwrap.indent(body, " " * pad).replace(" " * pad, f"{label + ':':<{pad}}", 1)


def _hanging(marker: str, text: str) -> str:
    """``  1. text`` with continuation lines aligned under the text."""
    lead = "  " + marker
    return textwrap.fill(
        " ".join(text.split()), WIDTH, initial_indent=lead, subsequent_indent=" " * len(lead)
    )


def _wrap(text: str, width: int) -> str:
    paragraphs = [" ".join(p.split()) for p in text.split("\n\n")]
    return "\n".join(textwrap.fill(p, width) for p in paragraphs if p)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A plain-text table; long cells wrap inside their column."""
    limits = [3, 30, 22, 34, 7]
    widths = [min(limits[i], max(len(r[i]) for r in [header, *rows])) for i in range(len(header))]
    lines = []
    for n, row in enumerate([header, *rows]):
        cells = [textwrap.wrap(cell, widths[i]) or [""] for i, cell in enumerate(row)]
        for k in range(max(len(c) for c in cells)):
            parts = [(c[k] if k < len(c) else "").ljust(widths[i]) for i, c in enumerate(cells)]
            lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("─" * w for w in widths))
    return lines
