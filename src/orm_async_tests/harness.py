"""The experiment harness (after SQLAlchemy's ``examples/performance``).

An experiment is one module ``testN_<subject>.py`` with one async function
registered by :func:`experiment`::

    @experiment(1, "Concurrent loader and dependent reader")
    async def run(lab: Lab, *, users: int = 200) -> None:
        '''Can two tasks, each with its own AsyncSession, ...?'''   # the question
        ...                                                         # the experiment
        lab.check("final count", "every user is committed once",    # the answer
                  expected=users, observed=count)

The docstring is the question; the keyword-only parameters are its sizes
(``poetry run test1 --users 1000``); every :meth:`Lab.check` records a claim,
what was expected, what was observed and whether they agree. The runner prints
a findings table and exits non-zero when any check fails, when the experiment
made no check at all, or when it raised.

Each run gets a unique :attr:`Lab.tag`; rows an experiment creates carry it
(usernames, group names, job queues) and are deleted afterwards, so runs can
repeat and interleave.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import secrets
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NoReturn

from sqlalchemy import delete, event, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from .db import Database, create_engine
from .errors import first_line as first_line  # re-exported: the experiments' toolbox
from .errors import sqlstate as sqlstate
from .models import Group, Job, User

Body = Callable[..., Awaitable[None]]


@dataclass(frozen=True)
class Check:
    name: str
    claim: str
    expected: str
    observed: str
    passed: bool


@dataclass(frozen=True)
class Figure:
    label: str
    value: float
    unit: str

    def shown(self) -> str:
        if self.unit == "s":
            return f"{self.value:.3f} s" if self.value < 10 else f"{self.value:.1f} s"
        if self.unit == "MiB":
            return f"{self.value:.2f} MiB"
        if self.unit in ("x", "ratio"):
            return f"{self.value:.2f}x"
        whole = self.value == int(self.value) or abs(self.value) >= 100
        number = f"{self.value:,.0f}" if whole else f"{self.value:,.2f}"
        return f"{number} {self.unit}".rstrip()


class Lab:
    """What an experiment gets: the database, a tag for its rows, and its record."""

    def __init__(self, db: Database, number: int) -> None:
        self.db = db
        self.tag = f"e{number}-{secrets.token_hex(3)}-"
        self.checks: list[Check] = []
        self.figures: list[Figure] = []
        self.notes: list[str] = []
        self._engines: list[AsyncEngine] = []

    @property
    def engine(self) -> AsyncEngine:
        return self.db.engine

    @property
    def sessions(self) -> async_sessionmaker[AsyncSession]:
        return self.db.sessions

    def check(
        self,
        name: str,
        claim: str,
        *,
        expected: Any,
        observed: Any,
        passed: bool | None = None,
    ) -> bool:
        """Record one finding. Without ``passed``, it passes when observed == expected."""
        ok = (observed == expected) if passed is None else bool(passed)
        self.checks.append(Check(name, claim, _text(expected), _text(observed), ok))
        return ok

    def figure(self, label: str, value: float, unit: str = "") -> float:
        """Record a measured figure (a timing, a size, a rate) for the report."""
        self.figures.append(Figure(label, float(value), unit))
        return value

    @contextmanager
    def timed(self, label: str) -> Iterator[list[float]]:
        """``with lab.timed("load"):`` records wall time; the yielded list gets the seconds."""
        box: list[float] = []
        started = time.perf_counter()
        try:
            yield box
        finally:
            box.append(time.perf_counter() - started)
            self.figure(label, box[0], "s")

    @contextmanager
    def statements(self, engine: AsyncEngine | None = None) -> Iterator[list[str]]:
        """``with lab.statements() as sent:`` collects the SQL each cursor executes."""
        sync_engine = (engine or self.engine).sync_engine
        sent: list[str] = []

        def record(
            conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool
        ) -> None:
            sent.append(" ".join(statement.split()))

        event.listen(sync_engine, "before_cursor_execute", record)
        try:
            yield sent
        finally:
            event.remove(sync_engine, "before_cursor_execute", record)

    def skip(self, reason: str) -> NoReturn:
        """Stop here: the experiment cannot run on this setup (reported as SKIPPED)."""
        raise Skip(reason)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def engine_with(self, **overrides: Any) -> AsyncEngine:
        """Another engine on the same server with some options changed (see
        :func:`.db.create_engine`); disposed after the run.

        Its connections carry ``application_name`` = :attr:`tag` unless told
        otherwise, so ``pg_stat_activity`` counts this run's connections only.
        """
        overrides.setdefault("application_name", self.tag)
        engine = create_engine(self.db.settings, self.db.target, **overrides)
        self._engines.append(engine)
        return engine

    async def close(self) -> None:
        for engine in self._engines:
            await engine.dispose()
        self._engines.clear()
        await delete_tagged(self.sessions, self.tag)


async def delete_tagged(sessions: async_sessionmaker[AsyncSession], tag: str) -> None:
    """Delete the rows a run created (users cascade to track points and memberships)."""
    async with sessions.begin() as session:
        # a connection left holding locks must not turn the cleanup into a hang
        await session.execute(text("SET LOCAL lock_timeout = '10s'"))
        await session.execute(delete(User).where(User.username.startswith(tag)))
        await session.execute(delete(Group).where(Group.name.startswith(tag)))
        await session.execute(delete(Job).where(Job.queue.startswith(tag)))


class Skip(Exception):
    """Raised by :meth:`Lab.skip`: the experiment cannot run here, and says why."""


@dataclass
class Result:
    experiment: Experiment
    params: dict[str, Any]
    checks: list[Check]
    figures: list[Figure]
    notes: list[str]
    seconds: float
    error: str | None = None
    """What the body raised (``describe``), if it raised."""
    traceback: str | None = field(default=None, repr=False)
    skipped: str | None = None
    """Why the experiment did not run (``lab.skip``): never counted as passed."""

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    @property
    def passed(self) -> bool:
        return self.error is None and self.skipped is None and bool(self.checks) and not self.failed

    def verdict(self) -> str:
        if self.skipped is not None:
            return f"SKIPPED: {self.skipped}"
        held = f"{len(self.checks) - len(self.failed)}/{len(self.checks)} checks hold"
        if self.error is not None:
            return f"ERROR: {self.error} (after {held})"
        if not self.checks:
            return "FAILED: the experiment made no check"
        return f"{'PASSED' if not self.failed else 'FAILED'}: {held}"


@dataclass
class Experiment:
    number: int
    title: str
    body: Body
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"test{self.number}"

    @property
    def question(self) -> str:
        return inspect.cleandoc(self.body.__doc__ or "").strip()

    async def run(self, db: Database, **params: Any) -> Result:
        """Run the body on ``db``; its checks, and what it raised or why it skipped."""
        unknown = set(params) - set(self.params)
        if unknown:
            raise TypeError(f"{self.name} has no parameter(s) {', '.join(sorted(unknown))}")
        values = {**self.params, **params}
        lab = Lab(db, self.number)
        started = time.perf_counter()
        result = Result(self, values, lab.checks, lab.figures, lab.notes, 0.0)
        try:
            await self.body(lab, **values)
        except Skip as why:
            result.skipped = str(why)
        except Exception as exc:
            result.error = describe(exc)
            result.traceback = traceback.format_exc()
        finally:
            await lab.close()
        result.seconds = time.perf_counter() - started
        return result

    def main(self, argv: list[str] | None = None) -> int:
        """Entry point of ``poetry run testN``: run this experiment, print, exit."""
        from .cli import run_one

        return run_one(self, argv)


REGISTRY: dict[int, Experiment] = {}


def experiment(number: int, title: str) -> Callable[[Body], Experiment]:
    """Register an async body as experiment ``number``; its keyword-only args are its sizes."""

    def register(body: Body) -> Experiment:
        signature = inspect.signature(body)
        params = {
            name: p.default
            for name, p in signature.parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }
        missing = [name for name, value in params.items() if value is inspect.Parameter.empty]
        if missing:
            raise TypeError(f"experiment {number}: give {', '.join(missing)} a default")
        if number in REGISTRY and REGISTRY[number].body.__module__ != body.__module__:
            raise ValueError(f"experiment number {number} is taken")
        found = Experiment(number, title, body, params)
        REGISTRY[number] = found
        return found

    return register


def describe(exc: BaseException) -> str:
    """``"TypeName: first line of the message"``: how experiments report an error."""
    return f"{type(exc).__name__}: {first_line(exc)}"


async def outcome(awaitable: Awaitable[Any]) -> str:
    """Await it: ``"ok"``, or :func:`describe` of what it raised."""
    try:
        await awaitable
    except Exception as exc:
        return describe(exc)
    return "ok"


async def one_transaction(sessions: async_sessionmaker[AsyncSession]) -> None:
    """Begin, ``SELECT 1``, commit: whether the next user of a pool or session factory
    gets a working transaction (wrap in :func:`outcome` to record what it raised)."""
    async with sessions.begin() as session:
        await session.execute(select(1))


def _text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, BaseException):
        return describe(value)
    return str(value)


def environment(overrides: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """This process's environment with ``overrides``; a ``None`` value removes the variable."""
    env = dict(os.environ)
    for key, value in (overrides or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a child server)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_env(lab: Lab, extra: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """This process's environment pointed at the lab's database, for a child process.

    ``DATABASE_URL`` (password included: it goes into the environment only, never
    into output) and ``DB_SCHEMA`` are what the lab uses, so ``Settings.from_env()``
    in the child finds the same server and schema; then ``extra`` (a ``None`` value
    removes the variable).
    """
    database: dict[str, str | None] = {
        "DATABASE_URL": lab.db.target.url.render_as_string(hide_password=False),
        "DB_SCHEMA": lab.db.settings.schema,
    }
    return environment({**database, **(extra or {})})


async def run_python(
    lab: Lab,
    code: str,
    *,
    within: float,
    options: Sequence[str] = (),
    extra_env: Mapping[str, str | None] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``python [options] -c code`` in a child process against the lab's database.

    The child's environment is :func:`child_env` with ``extra_env``. stdout and
    stderr are captured as text. A child still running after ``within`` seconds,
    or when the caller is cancelled, is killed; running out of time then raises
    :class:`subprocess.TimeoutExpired`.
    """
    env = child_env(lab, extra_env)
    args = [sys.executable, *options, "-c", code]
    proc = await asyncio.create_subprocess_exec(
        *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(within):
            out, err = await proc.communicate()
    except TimeoutError:
        raise subprocess.TimeoutExpired(args, within) from None
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    returncode = proc.returncode
    assert returncode is not None  # communicate() returns once the child has exited
    return subprocess.CompletedProcess(
        args, returncode, out.decode(errors="replace"), err.decode(errors="replace")
    )
