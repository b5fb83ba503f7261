"""What a scenario gets: the database, the sizes, a tag for its rows, and its record.

Each run gets a unique :attr:`Lab.tag`; rows an experiment creates carry it
(usernames, group names, job queues), and so do the ``application_name`` of
the engines it makes, so ``pg_stat_activity`` counts this run's connections
only. Rows, engines and fixtures are cleaned up after the last scenario, so
runs can repeat and interleave.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Generic, NoReturn, TypeVar, cast

from sqlalchemy import delete, event, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.pool import NullPool

from ..db import Database, create_engine, create_session_factory
from ..models import Group, Job, User
from .cells import Cell, NotHere, On, resolve, varies
from .checks import Check, make_check, shown
from .env import environment
from .results import Figure, ScenarioResult

S = TypeVar("S")
T = TypeVar("T")
Fixture = Callable[["Lab[Any]"], AbstractAsyncContextManager[Any]]


@dataclass(frozen=True)
class Execution:
    """One ``before_cursor_execute`` event: what SQLAlchemy handed to the driver."""

    verb: str
    """``INSERT``, ``SELECT``, ..."""
    style: str
    """``EXECUTE``, ``EXECUTEMANY`` or ``INSERTMANYVALUES`` (the context's execute_style)."""
    parameter_sets: int
    """For an executemany, how many parameter sets; 1 otherwise."""
    statement: str


class Skip(Exception):
    """Raised by :meth:`Lab.skip`: the scenario cannot run here, and says why."""


class Lab(Generic[S]):
    """The database, the sizes (``lab.sizes.users``) and the record of one run."""

    def __init__(self, db: Database, number: int, sizes: S) -> None:
        self.db = db
        self.sizes = sizes
        self.tag = f"e{number}-{secrets.token_hex(3)}-"
        self._part: ScenarioResult | None = None
        self._engines: list[AsyncEngine] = []
        self._stack = AsyncExitStack()
        self._fixtures: dict[Any, tuple[Any, BaseException | None]] = {}
        self.cell = cell_of(db)
        """The stack this run observes: ``lab.cell.driver`` (``"asyncpg"``/``"psycopg"``),
        ``lab.cell.line`` (``"2.0"``/``"2.1"``), ``lab.cell.server``."""

    # ------------------------------------------------------------------ the record

    def begin(self, part: ScenarioResult | None) -> None:
        """The runner: record what follows under this scenario (``None``: outside any)."""
        self._part = part

    @property
    def part(self) -> ScenarioResult:
        """The scenario being recorded; a check outside one (in a fixture's exit, say)
        would be counted nowhere, so it is refused."""
        if self._part is None:
            raise RuntimeError("a check, figure or note outside a scenario is counted nowhere")
        return self._part

    def check(self, name: str, claim: str, *, expected: Any, observed: Any) -> bool:
        """Record one finding: ``observed`` compared with ``expected`` (a value, a
        comparator of :mod:`.checks`, or a dict/list of those; ``on(asyncpg=…,
        psycopg=…)`` where it differs by cell, see :mod:`.cells`). Returns whether it
        held (``False`` for a check skipped on this cell)."""
        chosen = resolve(expected, self.cell)
        per_cell = expected.texts(shown) if isinstance(expected, On) else {}
        if not per_cell and varies(expected):
            per_cell = {"(per key)": "the expectation of some keys differs by cell"}
        if isinstance(chosen, NotHere):
            self.part.checks.append(
                Check(
                    self.part.name,
                    name,
                    " ".join(claim.split()),
                    "—",
                    "—",
                    False,
                    skipped=chosen.reason,
                    per_cell=per_cell,
                )
            )
            return False
        found = make_check(self.part.name, name, claim, chosen, observed)
        if per_cell:
            found = dataclasses.replace(found, per_cell=per_cell)
        self.part.checks.append(found)
        return found.passed

    def only_on(self, driver: str, reason: str) -> None:
        """Skip the rest of this scenario unless the run's driver is ``driver``
        (``reason``: what it observes that only that driver has)."""
        if self.cell.driver != driver:
            self.skip(f"{driver} only: {reason}")

    def figure(self, label: str, value: float, unit: str = "") -> float:
        """Record a measured figure (a timing, a size, a rate) for the report."""
        self.part.figures.append(Figure(label, float(value), unit))
        return value

    def note(self, text: str) -> None:
        """Something observed that is not a check (shown under the scenario)."""
        self.part.notes.append(" ".join(text.split()))

    def skip(self, reason: str) -> NoReturn:
        """Stop this scenario: it cannot run on this setup (reported as SKIPPED, with
        ``reason``; checks it made before still count)."""
        if not reason.strip():
            raise ValueError("lab.skip() needs the reason the scenario cannot run here")
        raise Skip(reason)

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
        with _recording(engine or self.engine, lambda e: e.statement) as sent:
            yield sent

    @contextmanager
    def executions(self, engine: AsyncEngine | None = None) -> Iterator[list[Execution]]:
        """Like :meth:`statements`, with each execution's style and parameter-set count:
        ``INSERTMANYVALUES`` (one statement, many rows) vs ``EXECUTEMANY`` (the driver's
        executemany, one parameter set per row) vs ``EXECUTE``."""
        with _recording(engine or self.engine, lambda e: e) as seen:
            yield seen

    # ------------------------------------------------------------- the database

    @property
    def engine(self) -> AsyncEngine:
        """The shared engine (the ``db`` module's): for probes and ordinary work."""
        return self.db.engine

    @property
    def sessions(self) -> async_sessionmaker[AsyncSession]:
        """The project's session factory on the shared engine."""
        return self.db.sessions

    def name(self, suffix: str) -> str:
        """``tag + suffix``: a username, a queue, an ``application_name`` of this run."""
        return f"{self.tag}{suffix}"

    def engine_with(self, **overrides: Any) -> AsyncEngine:
        """Another engine on the same server with some options changed (see
        :func:`.db.create_engine`: ``pool_size=2``, ``server_settings={...}``,
        ``driver_args={...}``, ``url_query={...}``); disposed after the run.

        Its connections carry ``application_name`` = :attr:`tag` unless told otherwise.
        """
        overrides.setdefault("application_name", self.tag)
        engine = create_engine(self.db.settings, self.db.target, **overrides)
        self._engines.append(engine)
        return engine

    def one_connection(self, **overrides: Any) -> AsyncEngine:
        """An engine whose pool holds exactly one connection (``pool_size=1,
        max_overflow=0``): whatever one session leaves in it, the next one meets."""
        return self.engine_with(**{"pool_size": 1, "max_overflow": 0, **overrides})

    def unpooled(self, **overrides: Any) -> AsyncEngine:
        """An engine with ``NullPool``: every checkout opens a new server connection."""
        return self.engine_with(poolclass=NullPool, **overrides)

    def sessions_on(self, engine: AsyncEngine, **options: Any) -> async_sessionmaker[AsyncSession]:
        """The project's session factory on ``engine`` (``expire_on_commit=True`` etc.
        to change an option)."""
        return create_session_factory(engine, **options)

    def child_env(self, extra: Mapping[str, str | None] | None = None) -> dict[str, str]:
        """This process's environment pointed at the lab's database, for a child process.

        ``DATABASE_URL`` (password included: it goes into the environment only, never
        into output) and ``DB_SCHEMA`` are what the lab uses, so ``Settings.from_env()``
        in the child finds the same server and schema; then ``extra`` (a ``None`` value
        removes the variable).
        """
        database: dict[str, str | None] = {
            "DATABASE_URL": self.db.target.url.render_as_string(hide_password=False),
            "DB_SCHEMA": self.db.settings.schema,
        }
        return environment({**database, **(extra or {})})

    # ------------------------------------------------------------------ fixtures

    async def use(self, fixture: Callable[[Lab[S]], AbstractAsyncContextManager[T]]) -> T:
        """What ``fixture(lab)`` (an ``@asynccontextmanager``) yields, entered the first
        time a scenario asks and exited after the last scenario; a fixture that raised
        (or skipped) raises the same for every scenario that uses it."""
        if fixture not in self._fixtures:
            try:
                value = await self._stack.enter_async_context(fixture(self))
            except Exception as exc:
                self._fixtures[fixture] = (None, exc)
            else:
                self._fixtures[fixture] = (value, None)
        value, failed = self._fixtures[fixture]
        if failed is not None:
            raise failed
        return cast(T, value)

    async def close(self) -> None:
        """Exit the fixtures, dispose the engines made here, delete the run's rows; each
        step runs even when one before it failed, and the first failure is raised."""
        failures: list[BaseException] = []
        steps: list[Callable[[], Awaitable[None]]] = [
            self._stack.aclose,
            *(engine.dispose for engine in self._engines),
            lambda: delete_tagged(self.sessions, self.tag),
        ]
        for step in steps:
            try:
                await step()
            except Exception as exc:
                failures.append(exc)
        self._engines.clear()
        if failures:
            raise failures[0]


def cell_of(db: Database) -> Cell:
    """The cell of a database: its driver, the installed SQLAlchemy line, the server kind."""
    from ..compat import LINE

    server = "embedded" if db.target.embedded is not None else "external"
    return Cell(db.target.url.get_driver_name(), LINE, server)


@contextmanager
def _recording(engine: AsyncEngine, keep: Callable[[Execution], T]) -> Iterator[list[T]]:
    """``keep(execution)`` of each statement a cursor of ``engine`` executes in the block."""
    kept: list[T] = []

    def record(
        conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool
    ) -> None:
        style = getattr(getattr(context, "execute_style", None), "name", "EXECUTE")
        sets = len(params) if style == "EXECUTEMANY" else 1
        verb = statement.lstrip().split(None, 1)[0].upper() if statement.strip() else ""
        kept.append(keep(Execution(verb, style, sets, " ".join(statement.split()))))

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        yield kept
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", record)


async def delete_tagged(sessions: async_sessionmaker[AsyncSession], tag: str) -> None:
    """Delete the rows a run created (users cascade to track points and memberships)."""
    async with sessions.begin() as session:
        # a connection left holding locks must not turn the cleanup into a hang
        await session.execute(text("SET LOCAL lock_timeout = '10s'"))
        await session.execute(delete(User).where(User.username.startswith(tag)))
        await session.execute(delete(Group).where(Group.name.startswith(tag)))
        await session.execute(delete(Job).where(Job.queue.startswith(tag)))
