"""What could close SQLAlchemy Core's gap on a primary-key read without leaving its SQL layer.

Each attempt is an :class:`~.cases.Implementation` with cases for ``get_by_pk`` and
``get_narrow`` only, changing ONE thing against ``sqlalchemy_best`` (Core
``select()`` built once, ``.one()``, an AUTOCOMMIT connection per task from an engine
made with ``isolation_level="AUTOCOMMIT"``, asyncpg, a LIFO pool);
its class docstring says what. They are timed side by side with ``asyncpg`` and
``sqlalchemy_best`` by :func:`.runner.run_group` (every cell checked first, repeats
interleaved), at each concurrency level, under each event loop (the default asyncio
loop and uvloop, each in a thread of its own with its own engine and data, so both
run the same code from a fresh start).

Verdict: an attempt is **kept** when it beats ``sqlalchemy_best`` beyond the noise:
the 95 % interval of their ratio (paired rounds) lies above 1. ``exec_driver_sql`` is
measured as a *reference*: SQL text in the driver's ``$1`` style is asyncpg under
SQLAlchemy's pool, outside the SQL layer, so it is never kept.

What the development runs showed (the figures: ``bench --profile``, docs/bench/attempts.md):
the engine-level AUTOCOMMIT was kept (SA best's engine is made so now; the
``OptionEngine`` it replaced is the first row), and :mod:`.profile` shows why: the
execution context's event dispatch is gone. ``.first()``/``.fetchone()``, explicit
columns, ``.mappings()`` and ``run_sync`` are noise; ``text()`` and ``exec_driver_sql``
build their result metadata on every execute (no compiled result map to reuse),
which eats most of what skipping the expression saves; an ``AsyncSession``, psycopg
3 and no compiled cache cost more. uvloop changes little for SQLAlchemy: its cost is
in the greenlet bridge, the execution path and the adapter, not in the loop.

Left out on purpose (nothing to measure on these two operations):

- ``pool_reset_on_return=None``, a warm ``get_raw_connection()``, pool options: a
  task checks out one connection for all its ops (the profile puts the pool at
  well under 1 % of an op);
- a bigger ``prepared_statement_cache_size`` or compiled cache: both statements are
  already cached (the profile's compile share is the cache-key lookup, not compiling);
- ``no_parameters``: only for statements without parameters; ``insertmanyvalues``:
  inserts only; ``prepared_statement_name_func``: names the same prepared statement;
- executing a cached ``stmt.compile()``: SQLAlchemy 2.1's ``execute`` takes
  executables only (``Compiled`` has no ``_execute_on_connection``, and 2.0's
  private ``_execute_compiled`` is gone);
- several ops per ``run_sync`` greenlet: that changes what one op is (batching).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from sqlalchemy import Row, bindparam, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from ..db import Database, open_database
from . import impl_asyncpg, impl_sqlalchemy_best as best
from .cases import Environment, Implementation
from .dataset import Dataset, Sizes, groups, users
from .operations import OPERATIONS
from .runner import Cell, Plan, run_group
from .stats import DASH, Estimate, Summary, ratio

OPERATION_KEYS = ("get_by_pk", "get_narrow")
ASYNCPG, BEST = impl_asyncpg.IMPL.key, best.IMPL.key
LOOPS = ("asyncio", "uvloop")
CONNECTION_BUDGET = 80
"""Connections the attempts of one group may hold: fits a server with PostgreSQL's default
``max_connections`` of 100 too (the embedded one allows 250)."""

H = TypeVar("H")


class Attempt(Implementation[H], Generic[H]):
    """An engine opened as ``sqlalchemy_best`` opens it, unless a subclass changes that."""

    driver = "asyncpg"
    engine_options: ClassVar[Mapping[str, Any]] = {"isolation_level": "AUTOCOMMIT"}
    """Given to ``create_async_engine`` (SA best's: an AUTOCOMMIT engine)."""
    execution_options: ClassVar[Mapping[str, Any]] = {}
    """Given to ``engine.execution_options()`` (an ``OptionEngine`` sharing the pool)."""
    reference: ClassVar[bool] = False
    """Outside SQLAlchemy's SQL layer: measured beside the attempts, never kept."""

    def __init__(self) -> None:
        super().__init__()
        self.db: Database | None = None
        self.engine: AsyncEngine | None = None

    @property
    def change(self) -> str:
        """What the attempt changes: the first line of its class docstring."""
        return (type(self).__doc__ or "").strip().splitlines()[0]

    async def open(self, env: Environment) -> None:
        self.db = env.open_database(self.driver, pool_use_lifo=True, **self.engine_options)
        engine = self.db.engine
        self.engine = (
            engine.execution_options(**self.execution_options) if self.execution_options else engine
        )

    async def close(self) -> None:
        if self.db is not None:
            await self.db.dispose()
            self.db = self.engine = None


class CoreAttempt(Attempt[AsyncConnection]):
    """Core on an AUTOCOMMIT ``AsyncConnection`` per task, as ``sqlalchemy_best``."""

    @asynccontextmanager
    async def task(self) -> AsyncIterator[AsyncConnection]:
        assert self.engine is not None
        async with self.engine.connect() as conn:
            yield conn


C = TypeVar("C", bound=CoreAttempt)


def _with_best_cases(impl: C) -> C:
    """Register ``sqlalchemy_best``'s own cases: the attempt changes the engine, not the op."""
    for key in OPERATION_KEYS:
        impl.case(key)(best.IMPL.cases[key].fn)
    return impl


class OptionAutocommit(CoreAttempt):
    """``engine.execution_options(isolation_level="AUTOCOMMIT")``: SA best before this was kept.

    The first attempt, and the one kept: SA best used to get its AUTOCOMMIT
    connections from an ``OptionEngine`` (this row), which applies the level through
    an ``engine_connect`` listener; any listener sets the engine's ``_has_events``,
    and every execute then dispatches ``before_execute``, ``after_execute``,
    ``before_cursor_execute`` and ``after_cursor_execute`` (to no one). SA best now
    gives the level to ``create_async_engine`` itself: set once per new DBAPI
    connection, no listener. This row shows what that saved.
    """

    key = "attempt_option_autocommit"
    label = "execution_options AUTOCOMMIT (the old SA best)"
    engine_options = {}
    execution_options = {"isolation_level": "AUTOCOMMIT"}


class NoCompiledCache(CoreAttempt):
    """``execution_options(compiled_cache=None)``: compile the statement on every execute.

    A control, not a hope: it shows what the compiled cache saves on each op.
    """

    key = "attempt_no_compiled_cache"
    label = "no compiled cache"
    execution_options = {"compiled_cache": None}


class Psycopg(CoreAttempt):
    """The same Core statements through SQLAlchemy's psycopg 3 async dialect instead of asyncpg."""

    key = "attempt_psycopg"
    label = "psycopg 3 driver"

    def __init__(self) -> None:
        super().__init__()
        self.driver = "psycopg"


class SessionCore(Attempt[AsyncSession]):
    """``AsyncSession.execute(core_stmt)`` on the AUTOCOMMIT engine, not an ``AsyncConnection``."""

    key = "attempt_session"
    label = "AsyncSession for Core"

    @asynccontextmanager
    async def task(self) -> AsyncIterator[AsyncSession]:
        async with AsyncSession(self.engine, expire_on_commit=False) as session:
            yield session


class First(CoreAttempt):
    """``.first()`` instead of ``.one()`` (no second fetch to prove there is one row)."""

    key = "attempt_first"
    label = ".first()"


class FetchOne(CoreAttempt):
    """``.fetchone()`` instead of ``.one()``: the cursor's next row, the result left open."""

    key = "attempt_fetchone"
    label = ".fetchone()"


class Mappings(CoreAttempt):
    """``.mappings().one()``: a ``RowMapping`` (dict-like) instead of a ``Row``."""

    key = "attempt_mappings"
    label = ".mappings().one()"


class Columns(CoreAttempt):
    """``select(*users.c)``: the columns listed one by one instead of ``select(users)``."""

    key = "attempt_columns"
    label = "explicit columns"


class Text(CoreAttempt):
    """A ``text()`` statement with a ``:b_id`` bind, built once: no column typing, no processors."""

    key = "attempt_text"
    label = "text() statement"


class RunSync(CoreAttempt):
    """``conn.run_sync(op)``: execute and ``.one()`` in the one greenlet ``execute`` spawns anyway.

    One op per greenlet, as ``execute`` has; it skips the ``AsyncConnection`` facade
    (argument checks, ``_ensure_sync_result``) around the sync call.
    """

    key = "attempt_run_sync"
    label = "run_sync(execute + .one())"


class DriverSql(CoreAttempt):
    """Reference: ``exec_driver_sql("… WHERE id = $1", (id,))``, SQL text in the driver's style."""

    key = "attempt_exec_driver_sql"
    label = "exec_driver_sql (reference)"
    reference = True


OPTION_AUTOCOMMIT = _with_best_cases(OptionAutocommit())
NO_COMPILED_CACHE = _with_best_cases(NoCompiledCache())
PSYCOPG = _with_best_cases(Psycopg())
SESSION = SessionCore()
FIRST, FETCHONE, MAPPINGS = First(), FetchOne(), Mappings()
COLUMNS, TEXT, RUN_SYNC, DRIVER_SQL = Columns(), Text(), RunSync(), DriverSql()

ATTEMPTS: tuple[Attempt[Any], ...] = (
    OPTION_AUTOCOMMIT,
    FIRST,
    FETCHONE,
    MAPPINGS,
    COLUMNS,
    TEXT,
    RUN_SYNC,
    SESSION,
    PSYCOPG,
    NO_COMPILED_CACHE,
    DRIVER_SQL,
)

GET_USER, GET_GROUP = best.GET_USER, best.GET_GROUP


@SESSION.case("get_by_pk")
async def session_user(session: AsyncSession, user_id: int) -> Row[Any]:
    """``session.execute(select(users)…)``: the Core statement through the ORM's execute."""
    return (await session.execute(GET_USER, {"b_id": user_id})).one()


@SESSION.case("get_narrow")
async def session_group(session: AsyncSession, group_id: int) -> Row[Any]:
    """``session.execute(select(groups)…)``: the Core statement through the ORM's execute."""
    return (await session.execute(GET_GROUP, {"b_id": group_id})).one()


@FIRST.case("get_by_pk")
async def first_user(conn: AsyncConnection, user_id: int) -> Row[Any] | None:
    """``.first()``: the first row, the result closed without looking for a second."""
    return (await conn.execute(GET_USER, {"b_id": user_id})).first()


@FIRST.case("get_narrow")
async def first_group(conn: AsyncConnection, group_id: int) -> Row[Any] | None:
    """``.first()``: the first row, the result closed without looking for a second."""
    return (await conn.execute(GET_GROUP, {"b_id": group_id})).first()


@FETCHONE.case("get_by_pk")
async def fetchone_user(conn: AsyncConnection, user_id: int) -> Row[Any] | None:
    """``.fetchone()``: the cursor's next row."""
    return (await conn.execute(GET_USER, {"b_id": user_id})).fetchone()


@FETCHONE.case("get_narrow")
async def fetchone_group(conn: AsyncConnection, group_id: int) -> Row[Any] | None:
    """``.fetchone()``: the cursor's next row."""
    return (await conn.execute(GET_GROUP, {"b_id": group_id})).fetchone()


@MAPPINGS.case("get_by_pk")
async def mapping_user(conn: AsyncConnection, user_id: int) -> Any:
    """``.mappings().one()``: a ``RowMapping``."""
    return (await conn.execute(GET_USER, {"b_id": user_id})).mappings().one()


@MAPPINGS.case("get_narrow")
async def mapping_group(conn: AsyncConnection, group_id: int) -> Any:
    """``.mappings().one()``: a ``RowMapping``."""
    return (await conn.execute(GET_GROUP, {"b_id": group_id})).mappings().one()


USER_BY_COLUMNS = select(*users.c).where(users.c.id == bindparam("b_id"))
GROUP_BY_COLUMNS = select(*groups.c).where(groups.c.id == bindparam("b_id"))


@COLUMNS.case("get_by_pk")
async def columns_user(conn: AsyncConnection, user_id: int) -> Row[Any]:
    """``select(*users.c)``, built once: the same SQL, a cache key of nine columns."""
    return (await conn.execute(USER_BY_COLUMNS, {"b_id": user_id})).one()


@COLUMNS.case("get_narrow")
async def columns_group(conn: AsyncConnection, group_id: int) -> Row[Any]:
    """``select(*groups.c)``, built once: the same SQL, a cache key of two columns."""
    return (await conn.execute(GROUP_BY_COLUMNS, {"b_id": group_id})).one()


USER_TEXT = text(f"SELECT {impl_asyncpg.USER_COLUMNS} FROM users WHERE id = :b_id")
GROUP_TEXT = text("SELECT id, name FROM groups WHERE id = :b_id")


@TEXT.case("get_by_pk")
async def text_user(conn: AsyncConnection, user_id: int) -> Row[Any]:
    """``text("SELECT … WHERE id = :b_id")``, built once: values as asyncpg decodes them."""
    return (await conn.execute(USER_TEXT, {"b_id": user_id})).one()


@TEXT.case("get_narrow")
async def text_group(conn: AsyncConnection, group_id: int) -> Row[Any]:
    """``text("SELECT id, name FROM groups WHERE id = :b_id")``, built once."""
    return (await conn.execute(GROUP_TEXT, {"b_id": group_id})).one()


def _one(stmt: Any, key: int) -> Callable[[Connection], Row[Any]]:
    """The sync op ``run_sync`` runs: execute ``stmt`` for ``key`` and take its one row."""

    def op(sync: Connection) -> Row[Any]:
        return sync.execute(stmt, {"b_id": key}).one()

    return op


@RUN_SYNC.case("get_by_pk")
async def run_sync_user(conn: AsyncConnection, user_id: int) -> Row[Any]:
    """``conn.run_sync(lambda c: c.execute(select(users)…).one())``: one greenlet, one op."""
    return await conn.run_sync(_one(GET_USER, user_id))


@RUN_SYNC.case("get_narrow")
async def run_sync_group(conn: AsyncConnection, group_id: int) -> Row[Any]:
    """``conn.run_sync(lambda c: c.execute(select(groups)…).one())``: one greenlet, one op."""
    return await conn.run_sync(_one(GET_GROUP, group_id))


@DRIVER_SQL.case("get_by_pk")
async def driver_sql_user(conn: AsyncConnection, user_id: int) -> Row[Any]:
    """``exec_driver_sql("SELECT … WHERE id = $1", (id,))``: no SQL expression at all."""
    sql = f"SELECT {impl_asyncpg.USER_COLUMNS} FROM users WHERE id = $1"
    return (await conn.exec_driver_sql(sql, (user_id,))).one()


@DRIVER_SQL.case("get_narrow")
async def driver_sql_group(conn: AsyncConnection, group_id: int) -> Row[Any]:
    """``exec_driver_sql("SELECT id, name FROM groups WHERE id = $1", (id,))``."""
    return (
        await conn.exec_driver_sql("SELECT id, name FROM groups WHERE id = $1", (group_id,))
    ).one()


# -- running ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timed:
    """One timed cell, with the event loop and the batch of attempts it ran in."""

    loop: str
    batch: int
    cell: Cell


@dataclass
class AttemptsRun:
    meta: dict[str, Any]
    timed: list[Timed] = field(default_factory=list)

    def find(self, loop: str, batch: int, level: int, op: str, impl: str) -> Cell | None:
        for t in self.timed:
            c = t.cell
            if (t.loop, t.batch, c.concurrency, c.operation, c.implementation) == (
                loop,
                batch,
                level,
                op,
                impl,
            ):
                return c
        return None


def _loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """``uvloop.new_event_loop`` for ``"uvloop"``; ``None`` (asyncio's default) otherwise."""
    if name != "uvloop":
        return None
    import uvloop

    return uvloop.new_event_loop


def batches(attempts: Sequence[Attempt[Any]], level: int) -> list[list[Attempt[Any]]]:
    """The attempts in groups small enough that theirs and the two baselines' pools of
    ``level`` connections fit :data:`CONNECTION_BUDGET`."""
    size = max(1, CONNECTION_BUDGET // level - 2)
    return [list(attempts[i : i + size]) for i in range(0, len(attempts), size)]


@dataclass(frozen=True)
class Setup:
    """What every group of a run shares."""

    levels: list[int]
    plan: Plan
    attempts: tuple[Attempt[Any], ...]
    operations: tuple[str, ...]
    sizes: Sizes


async def _batch(
    loop: str,
    index: int,
    batch: Sequence[Attempt[Any]],
    env: Environment,
    data: Dataset,
    setup: Setup,
) -> list[Timed]:
    """Open a batch of attempts, run one group per operation with the baselines, close it."""
    opened: list[Attempt[Any]] = []
    impls: list[Implementation[Any]] = [impl_asyncpg.IMPL, best.IMPL]
    found: list[Timed] = []
    try:
        for attempt in batch:
            opened.append(attempt)
            await attempt.open(env)
        gc.collect()
        gc.freeze()
        for key in setup.operations:
            cells = await run_group(
                [*impls, *batch], OPERATIONS[key], env.pool_size, data, setup.plan
            )
            found += [Timed(loop, index, cell) for cell in cells]
    finally:
        gc.unfreeze()
        for attempt in reversed(opened):
            await attempt.close()
    return found


async def _level(loop: str, level: int, db: Database, data: Dataset, setup: Setup) -> list[Timed]:
    """Every batch of attempts at one concurrency level, beside the same open baselines."""
    env = Environment(db, pool_size=level)
    baselines: list[Implementation[Any]] = []
    found: list[Timed] = []
    try:
        for impl in (impl_asyncpg.IMPL, best.IMPL):
            baselines.append(impl)
            await impl.open(env)
        for index, batch in enumerate(batches(setup.attempts, level)):
            found += await _batch(loop, index, batch, env, data, setup)
    finally:
        for impl in reversed(baselines):
            await impl.close()
    return found


async def _on_this_loop(loop: str, db: Database, setup: Setup) -> list[Timed]:
    """The whole run on the running loop, with an engine and data set of its own."""
    own = open_database(db.settings, target=db.target)
    found: list[Timed] = []
    try:
        data = Dataset(own, setup.sizes)
        try:
            await data.seed(writers=setup.levels[-1])
            for level in setup.levels:
                found += await _level(loop, level, own, data, setup)
        finally:
            await data.drop()
    finally:
        await own.dispose()
    return found


def _in_a_thread(loop: str, db: Database, setup: Setup) -> tuple[str, list[Timed]]:
    """Run :func:`_on_this_loop` on a new event loop of this (worker) thread: its class
    name, and what it timed."""
    with asyncio.Runner(loop_factory=_loop_factory(loop)) as runner:
        kind = type(runner.get_loop())
        return f"{kind.__module__}.{kind.__qualname__}", runner.run(_on_this_loop(loop, db, setup))


def _available(loops: Sequence[str]) -> tuple[list[str], list[str]]:
    """The loops that can run here, and those that cannot (uvloop not installed)."""
    from importlib.util import find_spec

    missing = [name for name in loops if name == "uvloop" and find_spec("uvloop") is None]
    return [name for name in loops if name not in missing], missing


async def run_attempts(
    db: Database,
    concurrency: Sequence[int],
    plan: Plan,
    *,
    loops: Sequence[str] = LOOPS,
    attempts: Sequence[Attempt[Any]] = ATTEMPTS,
    operations: Sequence[str] = OPERATION_KEYS,
    sizes: Sizes | None = None,
) -> AttemptsRun:
    """Time every attempt beside ``asyncpg`` and ``sqlalchemy_best`` at each level, under
    each event loop (each in a worker thread with its own engine and tagged data, gone
    when it returns); the caller's loop only waits."""
    setup = Setup(
        sorted(set(concurrency)), plan, tuple(attempts), tuple(operations), sizes or Sizes()
    )
    runnable, missing = _available(loops)
    run = AttemptsRun(meta=_meta(db, setup, missing))
    for loop in runnable:
        kind, timed = await asyncio.to_thread(_in_a_thread, loop, db, setup)
        run.meta["loops"][loop] = kind
        run.timed += timed
    return run


def _meta(db: Database, setup: Setup, missing: Sequence[str]) -> dict[str, Any]:
    from sqlalchemy.util._has_cython import HAS_CYEXTENSION

    from .profile import versions

    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "concurrency": setup.levels,
        "loops": {},
        "loops_missing": list(missing),
        "plan": dataclasses.asdict(setup.plan),
        "sizes": dataclasses.asdict(setup.sizes),
        "database": db.describe(),
        "versions": versions(),
        "sqlalchemy_cython": HAS_CYEXTENSION,
        "operations": {key: OPERATIONS[key].title for key in setup.operations},
        "baselines": {ASYNCPG: impl_asyncpg.IMPL.label, BEST: best.IMPL.label},
        "attempts": {
            a.key: {"label": a.label, "change": a.change, "reference": a.reference}
            for a in setup.attempts
        },
    }


# -- verdicts -----------------------------------------------------------------------------

KEPT, NOT_KEPT, REFERENCE, BASELINE, FAILED = "kept", "not kept", "reference", "baseline", "failed"


@dataclass(frozen=True)
class Outcome:
    """One implementation's cell of one group, against the group's baselines."""

    loop: str
    batch: int
    concurrency: int
    operation: str
    implementation: str
    summary: Summary | None
    vs_best: Estimate | None
    vs_asyncpg: Estimate | None
    verdict: str
    error: str | None = None


def verdict(
    attempt: Summary | None,
    baseline: Summary | None,
    *,
    reference: bool = False,
    paired: bool = True,
) -> str:
    """``kept`` when the attempt is faster than the baseline beyond the noise: the 95 %
    interval of their ratio (paired rounds, :func:`.stats.ratio`) lies above 1."""
    if attempt is None or baseline is None:
        return FAILED
    if reference:
        return REFERENCE
    found = ratio(attempt, baseline, paired=paired)
    return KEPT if found is not None and found.low > 1.0 else NOT_KEPT


def outcomes(run: AttemptsRun) -> list[Outcome]:
    """Every cell's outcome against the baselines of its own group (loop, batch, level,
    operation): the attempts', and the baselines' themselves."""
    references = {key for key, a in run.meta["attempts"].items() if a["reference"]}
    found = []
    for t in run.timed:
        c = t.cell
        is_baseline = c.implementation in (ASYNCPG, BEST)
        look = (t.loop, t.batch, c.concurrency, c.operation)
        base, top = run.find(*look, BEST), run.find(*look, ASYNCPG)
        b, a = (base.summary if base else None), (top.summary if top else None)
        if is_baseline:
            judged = BASELINE if c.summary is not None else FAILED
        else:
            judged = verdict(c.summary, b, reference=c.implementation in references)
        found.append(
            Outcome(
                loop=t.loop,
                batch=t.batch,
                concurrency=c.concurrency,
                operation=c.operation,
                implementation=c.implementation,
                summary=c.summary,
                vs_best=ratio(c.summary, b),
                vs_asyncpg=ratio(c.summary, a),
                verdict=judged,
                error=c.error,
            )
        )
    return found


@dataclass(frozen=True)
class LoopComparison:
    """One baseline under each loop (not interleaved: the loops run one after the other)."""

    concurrency: int
    operation: str
    implementation: str
    by_loop: dict[str, Summary | None]
    verdict: str
    """``kept`` when the 95 % interval of uvloop's rate over asyncio's lies above 1."""


def loop_comparisons(run: AttemptsRun) -> list[LoopComparison]:
    loops = list(run.meta["loops"])
    if loops[:2] != ["asyncio", "uvloop"]:
        return []
    found = []
    for level in run.meta["concurrency"]:
        for op in run.meta["operations"]:
            for impl in (ASYNCPG, BEST):
                cells = {loop: run.find(loop, 0, level, op, impl) for loop in loops}
                by_loop = {loop: c.summary if c else None for loop, c in cells.items()}
                judged = verdict(by_loop["uvloop"], by_loop["asyncio"], paired=False)
                found.append(LoopComparison(level, op, impl, by_loop, judged))
    return found


def to_json(run: AttemptsRun) -> dict[str, Any]:
    def summary(s: Summary | None) -> dict[str, float] | None:
        return None if s is None else {"median": s.median, "low": s.low, "high": s.high}

    return {
        "meta": run.meta,
        "outcomes": [
            {**dataclasses.asdict(o), "summary": summary(o.summary)} for o in outcomes(run)
        ],
        "loops": [
            {
                **dataclasses.asdict(c),
                "by_loop": {k: summary(v) for k, v in c.by_loop.items()},
            }
            for c in loop_comparisons(run)
        ],
        "cells": [
            {"loop": t.loop, "batch": t.batch, **dataclasses.asdict(t.cell)} for t in run.timed
        ],
    }


# -- report -------------------------------------------------------------------------------


def _label(run: AttemptsRun, key: str) -> str:
    attempt = run.meta["attempts"].get(key)
    return str(attempt["label"] if attempt else run.meta["baselines"].get(key, key))


def headline(run: AttemptsRun) -> str:
    m = run.meta
    v = m["versions"]
    plan = m["plan"]
    return (
        f"{m['date'][:10]} · Python {v['python']} · SQLAlchemy {v['sqlalchemy']} (Cython "
        f"{'on' if m['sqlalchemy_cython'] else 'off'}) · asyncpg {v.get('asyncpg', '?')} · "
        f"psycopg {v.get('psycopg', '?')} · loops: {', '.join(m['loops'].values()) or DASH} · "
        f"{plan['repeats']} interleaved timed runs of ~{plan['target']} s per cell"
    )


def markdown(run: AttemptsRun, *, title: str = "Attempts") -> str:
    out = [f"# {title}: closing SQLAlchemy Core's gap on a primary-key read", "", headline(run), ""]
    out.append(
        "Ops/s: median of the timed runs and its 95 % interval. An attempt is **kept** when "
        "the 95 % interval of its ratio to SQLAlchemy best (paired rounds) lies above 1; "
        "ratios are of medians, against the baselines of the attempt's own group (at a high "
        "concurrency the attempts run in batches, each with the baselines, so that every "
        "pool fits the server's connections)."
    )
    found = outcomes(run)
    for loop in run.meta["loops"]:
        for level in run.meta["concurrency"]:
            for op, op_title in run.meta["operations"].items():
                rows = [
                    o for o in found if (o.loop, o.concurrency, o.operation) == (loop, level, op)
                ]
                out += _group_table(run, f"{loop} · concurrency {level} · {op_title}", rows)
    out += _loops_table(run)
    out += ["", "## What each attempt changes", ""]
    out += [
        f"- **{a['label']}** (`{key}`): {a['change']}" for key, a in run.meta["attempts"].items()
    ]
    if run.meta["loops_missing"]:
        out += ["", f"Not run (not installed): {', '.join(run.meta['loops_missing'])}."]
    out.append("")
    return "\n".join(out)


def _group_table(run: AttemptsRun, title: str, rows: Sequence[Outcome]) -> list[str]:
    out = ["", f"## {title}", "", "| implementation | ops/s | ÷ SA best | ÷ asyncpg | verdict |"]
    out.append("|---|---:|---:|---:|---|")
    for o in rows:
        if o.batch > 0 and o.implementation == ASYNCPG:
            out.append(f"| *batch {o.batch + 1}, with its own baselines* | | | | |")
        shown = o.summary.shown() if o.summary else f"**failed**: {o.error}"
        out.append(
            f"| {_label(run, o.implementation)} | {shown} | {_ratio(o.vs_best)} | "
            f"{_ratio(o.vs_asyncpg)} | {o.verdict} |"
        )
    return out


def _ratio(found: Estimate | None) -> str:
    return DASH if found is None else found.shown()


def _loops_table(run: AttemptsRun) -> list[str]:
    comparisons = loop_comparisons(run)
    if not comparisons:
        return []
    out = ["", "## uvloop against the default asyncio loop", ""]
    out.append("Not interleaved: each loop's whole run comes after the other's.")
    out += [
        "",
        "| operation | c | implementation | asyncio | uvloop | uvloop ÷ asyncio | verdict |",
    ]
    out.append("|---|---:|---|---:|---:|---:|---|")
    for c in comparisons:
        a, u = c.by_loop["asyncio"], c.by_loop["uvloop"]
        out.append(
            f"| {run.meta['operations'][c.operation]} | {c.concurrency} | "
            f"{_label(run, c.implementation)} | {a.shown() if a else DASH} | "
            f"{u.shown() if u else DASH} | {_ratio(ratio(u, a, paired=False))} | {c.verdict} |"
        )
    return out


def write(run: AttemptsRun, directory: Path) -> list[Path]:
    """``attempts.json`` and ``attempts.md`` in ``directory`` (created); their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    json_path, md_path = directory / "attempts.json", directory / "attempts.md"
    json_path.write_text(json.dumps(to_json(run), indent=2) + "\n", encoding="utf-8")
    md_path.write_text(markdown(run), encoding="utf-8")
    return [json_path, md_path]
