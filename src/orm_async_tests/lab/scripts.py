"""``poetry run testN``: options from the experiment's source, then the run.

The parser is built from :mod:`.catalogue` (the module's syntax tree), so
``testN --help`` and a wrong option answer without importing SQLAlchemy; only a
real run imports the experiment and opens the database (:mod:`.runner`).

Exit status: 0 when every check of every experiment run holds, 1 when one
does not (or an experiment raised, or a scenario made no check), 2 when the
database setup is wrong (one line says what and what to do) or the command line
is, 130 on Ctrl-C, 141 when the reader of standard output went away
(``| head``), as for a tool killed by SIGPIPE.

Standard library only.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import textwrap
from collections.abc import Callable, Sequence
from functools import wraps
from typing import ParamSpec

from .catalogue import SIZE_TYPES, Entry, ExperimentError, entry

EXIT_OK, EXIT_FAILED, EXIT_SETUP, EXIT_INTERRUPTED, EXIT_PIPE_CLOSED = 0, 1, 2, 130, 141
P = ParamSpec("P")


def reader_may_leave(command: Callable[P, int]) -> Callable[P, int]:
    """Let ``orm-async-tests list | head`` end quietly instead of with a BrokenPipeError;
    an experiment module out of shape is one line (exit status 2), not a traceback."""

    @wraps(command)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> int:
        try:
            status = command(*args, **kwargs)
            sys.stdout.flush()
        except ExperimentError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_SETUP
        except BrokenPipeError:
            # Python flushes stdout again at exit: point it at /dev/null first.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_PIPE_CLOSED
        return status

    return guarded


DRIVERS = ("asyncpg", "psycopg")


def add_driver_option(parser: argparse.ArgumentParser) -> None:
    """``--driver asyncpg|psycopg``: see :func:`use_driver`."""
    parser.add_argument(
        "--driver",
        choices=DRIVERS,
        help="the async driver (default: the one DATABASE_URL names, else DB_DRIVER, else asyncpg)",
    )


def use_driver(driver: str | None) -> None:
    """Make ``driver`` this process's driver: ``DB_DRIVER``, and the scheme of a
    ``DATABASE_URL`` that names an async driver of its own (the command line wins over
    both; child processes inherit it)."""
    if driver is None:
        return
    os.environ["DB_DRIVER"] = driver
    url = os.environ.get("DATABASE_URL", "")
    os.environ["DATABASE_URL"] = re.sub(
        rf"^(postgres(?:ql)?)\+(?:{'|'.join(DRIVERS)})://", rf"\1+{driver}://", url.strip()
    )
    if not url:
        del os.environ["DATABASE_URL"]


def script_parser(entry: Entry) -> argparse.ArgumentParser:
    """``testN``'s options: one per size, and ``--only`` to run some scenarios."""
    scenarios = "\n".join(
        textwrap.fill(
            f"{name}: {' '.join(doc.split())}",
            96,
            initial_indent="  ",
            subsequent_indent="      ",
        )
        for name, doc in entry.scenarios
    )
    parser = argparse.ArgumentParser(
        prog=entry.name,
        description=textwrap.fill(f"{entry.title}. {entry.question}", 96),
        epilog=f"scenarios, in order:\n{scenarios}\n\n"
        "Database: DATABASE_URL, or the embedded PostgreSQL when unset; driver: --driver, "
        "the one DATABASE_URL names, DB_DRIVER, or asyncpg.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for size in entry.sizes:
        option = f"--{size.name.replace('_', '-')}"
        explained = f"{size.doc} " if size.doc else ""
        if size.type == "bool":
            parser.add_argument(
                option,
                dest=size.name,
                action=argparse.BooleanOptionalAction,
                default=size.default,
                help=f"{explained}(default: {size.default})",
            )
        else:
            parser.add_argument(
                option,
                dest=size.name,
                type=SIZE_TYPES[size.type],
                default=size.default,
                metavar=size.type.upper(),
                help=f"{explained}(default: {size.default})",
            )
    parser.add_argument(
        "--only",
        action="append",
        choices=[name for name, _ in entry.scenarios],
        metavar="SCENARIO",
        help="run only this scenario (repeatable); the names are listed below",
    )
    add_driver_option(parser)
    return parser


@reader_may_leave
def run_script(number: int, argv: Sequence[str] | None = None) -> int:
    """The body of ``poetry run testN [--size value ...] [--only SCENARIO]``."""
    found = entry(number)
    if found is None:
        print(f"error: there is no experiment {number}", file=sys.stderr)
        return EXIT_SETUP
    args = vars(script_parser(found).parse_args(argv))
    only = args.pop("only")
    use_driver(args.pop("driver"))
    from .runner import Planned, run_guarded

    return run_guarded([Planned(found.module, args, only)])


def script(number: int) -> Callable[[], int]:
    """The console-script function of experiment ``number`` (``cli.testN``)."""

    def main() -> int:
        return run_script(number)

    main.__name__ = main.__qualname__ = f"test{number}"
    return main


def known_script(name: str) -> Callable[[], int] | None:
    """``script(N)`` for ``name == "testN"`` when experiment N exists."""
    if name.startswith("test") and name[4:].isdigit() and entry(int(name[4:])) is not None:
        return script(int(name[4:]))
    return None
