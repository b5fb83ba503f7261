"""When a deploy's migration alters a table or recreates an enum type from another
engine while the application's pool is warm, how many requests fail on the prepared
statements the pool has cached, with which error, is the request's transaction lost, does
the next try work, and do the cache settings (asyncpg ``prepared_statement_cache_size=0``,
psycopg ``prepare_threshold=None``) prevent it?

For each configuration of the driver (asyncpg: SQLAlchemy's default statement cache, then
``?prepared_statement_cache_size=0`` in the URL; psycopg: ``prepare_threshold`` 5, the
default, then 0, then ``None``) an engine with a pool of K connections (``pool_size=K,
max_overflow=0``) warms all K at once: each runs the same INSERT and the same SELECT of a
scratch table with an enum column ``warm_runs`` times and commits, and counts its
server-side prepared statements (``pg_prepared_statements``). Then a second engine (the
migrator: its dialect shares no cache with the application's, as in another process)
either changes the type of a column the SELECT returns (``text`` to ``varchar(40)``) or
recreates the enum type the Alembic way (rename, create with one more label, convert the
column, drop the old type). Each of the K connections then serves one request: a write
with a statement no cache has seen (the "before" row), the warmed INSERT, the warmed
SELECT, committed or rolled back on an error, either in a transaction or in AUTOCOMMIT;
then the request is retried on all K, ``retries`` times. Every round has its own table and
enum, dropped at the end.

Observed: with the caches on, every migration breaks cached statements, and the drivers
differ in how many requests pay for it and whether they recover. asyncpg (through
SQLAlchemy): one error per engine, whatever K: the server refuses the stale SELECT (0A000,
which asyncpg rewords as ``InvalidCachedStatementError`` "cached statement plan is invalid
due to a database schema or configuration change", raised as ``NotSupportedError``) or the
INSERT whose parameter was typed as the dropped enum (XX000 "cache lookup failed for type
<oid>", ``InternalError``), and SQLAlchemy answers either by invalidating the prepared
statements of every connection of the engine, so the other K-1 connections re-prepare and
succeed and every retry works. psycopg: one error per connection (K), and in autocommit
after the enum is recreated two per connection (the SELECT's result type changed too).
Inside a transaction the error aborts it: the request's earlier write is lost (and a
statement after the error fails with 25P02 "current transaction is aborted"); the rollback
also makes psycopg forget all of the connection's prepared statements, so the retry
works. In autocommit nothing is lost, but psycopg's stale statement never heals: psycopg
keeps it as prepared after the failure, and ``rollback()`` on an idle connection (the
pool's reset included) sends nothing and clears nothing, so every retry on every
connection fails the same way. Neither driver nor SQLAlchemy retries anything. Also:
psycopg's ``rollback()`` deallocates every prepared statement of the connection, so a
checkout that ends without a commit (reset by the pool's ROLLBACK) leaves it none, while
SQLAlchemy's asyncpg cache survives rollbacks. The fixes hold: with
``prepared_statement_cache_size=0`` (asyncpg) or ``prepare_threshold=None`` (psycopg) no
prepared statement is left on the connections and no request fails in any of the four
rounds; ``prepare_threshold=0`` only prepares sooner and fails like the default.

Sources: SQLAlchemy docs, PostgreSQL dialect, asyncpg, "Prepared Statement Cache" (the
cache of 100 statements per DBAPI connection, ``prepared_statement_cache_size=0`` in the
URL to disable it; the warning that DDL from another engine or process raises
``InvalidCachedStatementError`` or "cache lookup failed for type", that the dialect then
clears its caches and the driver's, and that it cannot retry because the transaction is
invalidated): confirmed, per engine as observed, in a transaction and in autocommit alike.
psycopg 3 docs, "Prepared statements" (a query is prepared once it has been executed more
than ``prepare_threshold`` times on a connection, 5 by default; ``None`` disables them):
confirmed, and 0 prepares a query at its first execution; that ``rollback()`` deallocates
them all is not said there (psycopg's source: the prepare manager is cleared on ROLLBACK).
Issue threads, as observed here: sqlalchemy/sqlalchemy#6645 (stale asyncpg caches after an
enum is dropped and recreated by another engine: both errors reproduced, and the dialect's
recovery that came of it: the next statement on every connection works);
MagicStack/asyncpg#458 (InvalidCachedStatementError during a migration, "once for each
process": confirmed as one error per engine; asyncpg#103, which it cites, re-prepares and
retries outside a transaction only in asyncpg's own statement cache: through SQLAlchemy the
error surfaces in autocommit too); psycopg/psycopg#511 ("cached plan must not change result
type" after a schema change; the maintainer's advice, ``prepare_threshold=None``, is
confirmed as the fix; not said there and observed here: in a transaction the rollback heals
each connection after one error, in autocommit the connection keeps failing).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Column, Enum, Integer, MetaData, String, Table, func, insert, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .lab import BadSizes, Lab, driver_error, experiment, first_line, on, prefix, sqlstate

KINDS = ("a", "b", "c")
"""The enum's labels (the recreated enum gets one more, as a migration adding a value)."""


@dataclass(frozen=True)
class Sizes:
    connections: int = 3
    """Pooled connections warmed (pool_size, max_overflow=0): K in the claims."""
    warm_runs: int = 6
    """Times each connection runs the SELECT and the INSERT before the migration; more than
    psycopg's default prepare_threshold (5), so psycopg prepares them too."""
    retries: int = 2
    """Times the request is retried after the first try, each on all K connections."""
    bound: float = 15.0
    """Seconds one round (create, warm, migrate, try, retry, drop) may take: a hang fails."""

    def __post_init__(self) -> None:
        if self.connections < 2:
            raise BadSizes(
                f"connections ({self.connections}) must be at least 2: whether one failure "
                "clears the whole pool or each connection fails on its own needs two"
            )
        if self.warm_runs < 6:
            raise BadSizes(
                f"warm_runs ({self.warm_runs}) must be at least 6: psycopg prepares a query "
                "only once it has been executed more than prepare_threshold (5) times"
            )
        if self.retries < 1:
            raise BadSizes("retries must be at least 1: whether the next try works is a question")
        if self.bound <= 0:
            raise BadSizes("bound must be positive")


run = experiment(19, "DDL from another engine vs cached prepared statements", Sizes)


# ---------------------------------------------------------------- configurations
@dataclass(frozen=True)
class Config:
    """One way of configuring the application's engine."""

    label: str
    url_query: dict[str, str] = field(default_factory=dict)
    driver_args: dict[str, Any] = field(default_factory=dict)


CONFIGS: dict[str, tuple[Config, ...]] = {
    "asyncpg": (
        Config("cache of 100 statements (default)"),
        Config(
            "?prepared_statement_cache_size=0", url_query={"prepared_statement_cache_size": "0"}
        ),
    ),
    "psycopg": (
        Config("prepare_threshold=5 (default)"),
        Config("prepare_threshold=0", driver_args={"prepare_threshold": 0}),
        Config("prepare_threshold=None", driver_args={"prepare_threshold": None}),
    ),
}
ASYNCPG_DEFAULT, ASYNCPG_OFF = (c.label for c in CONFIGS["asyncpg"])
PSYCOPG_DEFAULT, PSYCOPG_ZERO, PSYCOPG_OFF = (c.label for c in CONFIGS["psycopg"])


def configs(lab: Lab[Sizes]) -> tuple[Config, ...]:
    found = CONFIGS.get(lab.cell.driver)
    if found is None:
        lab.skip(f"no configurations for driver {lab.cell.driver}")
    return found


@asynccontextmanager
async def app_engine(lab: Lab[Sizes], config: Config) -> AsyncIterator[AsyncEngine]:
    """The application's engine for one round: a pool of exactly K connections; the URL
    gets the config's query (as the SQLAlchemy docs show it), the driver its connect
    arguments; disposed when the round ends."""
    engine = lab.engine_with(
        application_name=lab.name("app"),
        driver_args=config.driver_args,
        url_query=config.url_query,
        pool_size=lab.sizes.connections,
        max_overflow=0,
    )
    try:
        yield engine
    finally:
        await engine.dispose()


# ---------------------------------------------------------------- the scratch objects
@dataclass
class Scratch:
    """The migrator's engine (another engine: its dialect shares no cache with the app's)
    and the scratch tables and enum types made so far, dropped after the run."""

    engine: AsyncEngine
    made: list[str] = field(default_factory=list)

    async def create(self, name: str) -> Table:
        table = scratch_table(name)
        self.made.append(name)
        async with self.engine.begin() as conn:
            await conn.run_sync(table.metadata.create_all)
        return table

    async def drop(self, name: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(text(f"DROP TABLE IF EXISTS {name}"))
            await conn.execute(text(f"DROP TYPE IF EXISTS {name}_kind"))
            await conn.execute(text(f"DROP TYPE IF EXISTS {name}_kind_old"))
        self.made.remove(name)


def scratch_table(name: str) -> Table:
    return Table(
        name,
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("name", String),
        Column("kind", Enum(*KINDS, name=f"{name}_kind")),
    )


@asynccontextmanager
async def scratch(lab: Lab[Sizes]) -> AsyncIterator[Scratch]:
    """The migrator (an unpooled engine, lock_timeout 5 s so a held lock fails instead of
    hanging); every scratch object is dropped at the end, even after a failure."""
    engine = lab.unpooled(
        application_name=lab.name("migrator"), server_settings={"lock_timeout": "5s"}
    )
    found = Scratch(engine)
    try:
        yield found
    finally:
        for name in list(found.made):
            await found.drop(name)


# ---------------------------------------------------------------- the migrations
ALTER_COLUMN = "alter column type"
RECREATE_ENUM = "recreate enum"


async def migrate(conn: AsyncConnection, name: str, ddl: str) -> None:
    """The migration, in one transaction on the migrator: change the type of a column the
    SELECT returns (text to varchar(40)), or recreate the enum type with one more label the
    way Alembic migrations do (rename the old type, create the new, convert, drop the old)."""
    if ddl == ALTER_COLUMN:
        statements = [f"ALTER TABLE {name} ALTER COLUMN name TYPE varchar(40)"]
    else:
        labels = ", ".join(f"'{k}'" for k in (*KINDS, "d"))
        statements = [
            f"ALTER TYPE {name}_kind RENAME TO {name}_kind_old",
            f"CREATE TYPE {name}_kind AS ENUM ({labels})",
            f"ALTER TABLE {name} ALTER COLUMN kind TYPE {name}_kind USING kind::text::{name}_kind",
            f"DROP TYPE {name}_kind_old",
        ]
    for statement in statements:
        await conn.execute(text(statement))


# ---------------------------------------------------------------- what one try records
STALE = re.compile(
    r"cached statement plan is invalid|cached plan must not change result type"
    r"|cache lookup failed for type"
)
"""The errors of a stale cached statement (asyncpg's rewording, the server's two)."""


def label(exc: DBAPIError) -> str:
    """``[SQLSTATE] SQLAlchemyClass <- DriverClass: message``, type OIDs as ``<oid>``."""
    found = driver_error(exc)
    message = re.sub(r"\b\d{4,}\b", "<oid>", first_line(found))
    return f"[{sqlstate(exc)}] {type(exc).__name__} <- {type(found).__name__}: {message}"


@dataclass
class Round:
    """One configuration, one migration, one mode: what each of the K connections saw."""

    config: str
    pids: list[int]
    """The warmed backends."""
    prepared: list[int]
    """Prepared statements naming the table on each warmed connection."""
    tried_on: list[int] = field(default_factory=list)
    """The backends the first try ran on."""
    first: list[list[str]] = field(default_factory=list)
    """Per connection, the outcome of each statement of the first try."""
    retries: list[list[str]] = field(default_factory=list)
    """Per retry and connection, "ok" or the first error."""
    before_kept: int = 0
    """The first try's "before" rows still in the table at the end."""
    seconds: float = 0.0

    def failures(self) -> int:
        return sum(STALE.search(o) is not None for steps in self.first for o in steps)

    def errors(self) -> list[str]:
        return sorted({o for steps in self.first for o in steps if o != "ok"})

    def retries_ok(self) -> int:
        return sum(o == "ok" for per_conn in self.retries for o in per_conn)

    def summary(self) -> dict[str, Any]:
        return {
            "tried on the warmed backends": sorted(self.tried_on) == sorted(self.pids),
            "prepared per connection before": self.prepared,
            "stale-statement errors": self.failures(),
            "errors": self.errors(),
        }


async def outcome(conn: AsyncConnection, statement: Any) -> str:
    try:
        await conn.execute(statement)
    except DBAPIError as exc:
        return label(exc)
    return "ok"


async def prepared_count(conn: AsyncConnection, table: str) -> int:
    """Server-side prepared statements of this session that name the table (the pattern is
    a parameter, so this query does not count itself)."""
    found = await conn.scalar(
        text("SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE :pattern"),
        {"pattern": f"%{table}%"},
    )
    return int(found or 0)


async def backend_pid(conn: AsyncConnection) -> int:
    return int(await conn.scalar(text("SELECT pg_backend_pid()")) or 0)


@asynccontextmanager
async def all_connections(engine: AsyncEngine, k: int) -> AsyncIterator[list[AsyncConnection]]:
    """The K pooled connections checked out at once (so each one is used), returned to the
    pool (reset: ROLLBACK) at the end of the block."""
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(engine.connect()) for _ in range(k)]


def select_rows(table: Table) -> Any:
    return select(table.c.id, table.c.name, table.c.kind).where(table.c.id > 0).limit(5)


def insert_row(table: Table, name: str) -> Any:
    return insert(table).values(name=name, kind="b")


async def warm(lab: Lab[Sizes], engine: AsyncEngine, table: Table) -> Round:
    """Each of the K connections runs the INSERT and the SELECT ``warm_runs`` times and
    commits, so it goes back to the pool idle (psycopg's rollback() at check-in then sends
    nothing and keeps the prepared statements: see the first scenario); then reports its
    backend pid and its prepared statements naming the table."""
    pids, prepared = [], []
    async with all_connections(engine, lab.sizes.connections) as conns:
        for i, conn in enumerate(conns):
            for _ in range(lab.sizes.warm_runs):
                await conn.execute(insert_row(table, f"warm-{i}"))
                await conn.execute(select_rows(table))
            await conn.commit()
            pids.append(await backend_pid(conn))
            prepared.append(await prepared_count(conn, table.name))
            await conn.commit()
    return Round("", pids, prepared)


async def request(conn: AsyncConnection, table: Table, name: str, autocommit: bool) -> list[str]:
    """One request: a write no cache has seen (an INSERT of the name only: the "before"
    row), then the warmed INSERT and the warmed SELECT; committed if all went well, rolled
    back otherwise. In autocommit each statement is its own transaction."""
    if autocommit:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
    steps = [
        await outcome(conn, insert(table).values(name=name)),
        await outcome(conn, insert_row(table, name)),
        await outcome(conn, select_rows(table)),
    ]
    if all(o == "ok" for o in steps):
        await conn.commit()
    else:
        await conn.rollback()
    return steps


async def one_round(
    lab: Lab[Sizes], config: Config, suffix: str, ddl: str, *, autocommit: bool
) -> Round:
    """Create a scratch table and enum; warm the K connections; migrate from the migrator;
    on each connection try one request, then retry it ``retries`` times (each retry a new
    checkout of all K); count the first try's "before" rows kept."""
    room = await lab.use(scratch)
    name = f"{lab.tag.replace('-', '_')}{suffix}"
    k, started = lab.sizes.connections, time.perf_counter()
    async with asyncio.timeout(lab.sizes.bound):
        table = await room.create(name)
        try:
            async with app_engine(lab, config) as engine:
                found = await warm(lab, engine, table)
                found.config = config.label
                async with room.engine.begin() as conn:
                    await migrate(conn, name, ddl)
                async with all_connections(engine, k) as conns:
                    for i, conn in enumerate(conns):
                        found.tried_on.append(await backend_pid(conn))
                        await conn.commit()
                        found.first.append(await request(conn, table, f"before-{i}", autocommit))
                for n in range(lab.sizes.retries):
                    async with all_connections(engine, k) as conns:
                        tries = [
                            await request(conn, table, f"retry{n}-{i}", autocommit)
                            for i, conn in enumerate(conns)
                        ]
                    found.retries.append([first_error(steps) for steps in tries])
            async with room.engine.connect() as conn:
                kept = await conn.scalar(
                    select(func.count())
                    .select_from(table)
                    .where(table.c.name.like("before-%"), table.c.kind.is_(None))
                )
        finally:
            await room.drop(name)
    found.before_kept = int(kept or 0)
    found.seconds = time.perf_counter() - started
    return found


def first_error(steps: Sequence[str]) -> str:
    return next((o for o in steps if o != "ok"), "ok")


async def rounds(lab: Lab[Sizes], ddl: str, *, autocommit: bool) -> dict[str, Round]:
    """One round per configuration of this driver."""
    key = ("a" if ddl == ALTER_COLUMN else "e") + ("c" if autocommit else "t")
    found = {}
    for n, config in enumerate(configs(lab)):
        found[config.label] = await one_round(lab, config, f"{key}{n}", ddl, autocommit=autocommit)
    mode = "autocommit" if autocommit else "transaction"
    lab.figure(f"{ddl}, {mode}: all rounds", sum(r.seconds for r in found.values()), "s")
    return found


async def warm_then_rollback(
    lab: Lab[Sizes], config: Config, suffix: str
) -> tuple[Round, list[int]]:
    """Warm the K connections (committed), then run the SELECT once more on each and
    return them to the pool without a commit (the pool's reset-on-return: ROLLBACK); then
    count the prepared statements again."""
    room = await lab.use(scratch)
    name = f"{lab.tag.replace('-', '_')}{suffix}"
    k = lab.sizes.connections
    async with asyncio.timeout(lab.sizes.bound):
        table = await room.create(name)
        try:
            async with app_engine(lab, config) as engine:
                found = await warm(lab, engine, table)
                found.config = config.label
                async with all_connections(engine, k) as conns:
                    for conn in conns:
                        await conn.execute(select_rows(table))
                after = []
                async with all_connections(engine, k) as conns:
                    for conn in conns:
                        after.append(await prepared_count(conn, table.name))
        finally:
            await room.drop(name)
    return found, after


# ---------------------------------------------------------------- the expectations
A_CHANGED = prefix(
    "[0A000] NotSupportedError <- InvalidCachedStatementError: cached statement plan is "
    "invalid due to a database schema or configuration change"
)
A_LOOKUP = "[XX000] InternalError <- InternalServerError: cache lookup failed for type <oid>"
A_ABORTED = prefix(
    "[25P02] DBAPIError <- InFailedSQLTransactionError: current transaction is aborted"
)
P_CHANGED = (
    "[0A000] NotSupportedError <- FeatureNotSupported: cached plan must not change result type"
)
P_LOOKUP = "[XX000] InternalError <- InternalError_: cache lookup failed for type <oid>"
P_ABORTED = prefix(
    "[25P02] InternalError <- InFailedSqlTransaction: current transaction is aborted"
)

PREPARED = {ASYNCPG_DEFAULT: 2, ASYNCPG_OFF: 0, PSYCOPG_DEFAULT: 2, PSYCOPG_ZERO: 2, PSYCOPG_OFF: 0}
"""Prepared statements naming the table per warmed connection: the INSERT and the SELECT,
or none where the cache is off."""


def stale(lab: Lab[Sizes], config: str, failures: int, errors: list[Any]) -> dict[str, Any]:
    """What :meth:`Round.summary` must say for ``config``."""
    return {
        "tried on the warmed backends": True,
        "prepared per connection before": [PREPARED[config]] * lab.sizes.connections,
        "stale-statement errors": failures,
        "errors": errors,
    }


def cost(kept: int, retries_ok: int, retry_errors: list[Any]) -> dict[str, Any]:
    return {
        "'before' rows kept": kept,
        "retries that worked": retries_ok,
        "retry errors": retry_errors,
    }


def costs(found: dict[str, Round]) -> dict[str, dict[str, Any]]:
    return {
        label: cost(
            r.before_kept,
            r.retries_ok(),
            sorted({o for per_conn in r.retries for o in per_conn if o != "ok"}),
        )
        for label, r in found.items()
    }


def summaries(found: dict[str, Round]) -> dict[str, dict[str, Any]]:
    return {label: r.summary() for label, r in found.items()}


# ---------------------------------------------------------------- the scenarios
@run.scenario
async def a_warm_pool_prepares_its_statements(lab: Lab[Sizes]) -> None:
    """For each configuration of the driver: a scratch table, an engine whose pool holds K
    connections; all K checked out at once, each runs the INSERT and the SELECT warm_runs
    times and commits, then counts its server-side prepared statements naming the table
    (pg_prepared_statements). Then each runs the SELECT once more and goes back to the pool
    without a commit, and the count is taken again."""
    k = lab.sizes.connections
    found: dict[str, Round] = {}
    after: dict[str, list[int]] = {}
    for n, config in enumerate(configs(lab)):
        found[config.label], after[config.label] = await warm_then_rollback(lab, config, f"w{n}")
    lab.check(
        "each warmed connection is its own backend and holds the prepared statements",
        "The K connections are K backends, and after the warm-up each holds 2 server-side "
        "prepared statements for the table (the INSERT and the SELECT): asyncpg through "
        "SQLAlchemy's own per-connection cache of asyncpg PreparedStatements (100 by default), "
        "psycopg once a query has run more than prepare_threshold (5) times, or from its "
        "first run with 0. With the caches off none is left on the server: SQLAlchemy's "
        "asyncpg adapter still prepares each statement (it needs the result's description) "
        "but keeps no reference to it, and asyncpg closes it; psycopg with "
        "prepare_threshold=None never "
        "prepares.",
        expected=on(
            asyncpg={
                c.label: {"backends": k, "prepared": [PREPARED[c.label]] * k}
                for c in CONFIGS["asyncpg"]
            },
            psycopg={
                c.label: {"backends": k, "prepared": [PREPARED[c.label]] * k}
                for c in CONFIGS["psycopg"]
            },
        ),
        observed={
            label: {"backends": len(set(r.pids)), "prepared": r.prepared}
            for label, r in found.items()
        },
    )
    lab.check(
        "a ROLLBACK at check-in deallocates psycopg's prepared statements",
        "A connection returned to the pool inside a transaction is reset with a ROLLBACK. "
        "psycopg's rollback() forgets every prepared statement (and the counts toward "
        "prepare_threshold) and sends DEALLOCATE ALL, so after a request that ends without a "
        "commit a psycopg connection has none left to go stale. SQLAlchemy's asyncpg cache is "
        "not touched by a rollback: the statements stay prepared.",
        expected=on(
            asyncpg={ASYNCPG_DEFAULT: [2] * k, ASYNCPG_OFF: [0] * k},
            psycopg={c.label: [0] * k for c in CONFIGS["psycopg"]},
        ),
        observed=after,
    )


@run.scenario
async def alter_column_type_in_a_transaction(lab: Lab[Sizes]) -> None:
    """For each configuration: warm the K connections, then the migrator changes the type of
    the name column (text to varchar(40)); on each connection one request in a transaction
    (a "before" write, the warmed INSERT, the warmed SELECT), rolled back on an error; then
    the request is retried on all K, retries times."""
    found = await rounds(lab, ALTER_COLUMN, autocommit=False)
    k, tries = lab.sizes.connections, lab.sizes.connections * lab.sizes.retries
    lab.check(
        "alter column type: one error per pool (asyncpg), one per connection (psycopg)",
        "The SELECT returns the altered column, so its prepared plan is refused by the server "
        "(0A000 'cached plan must not change result type'; the INSERT, whose result is only "
        "the id, is re-planned silently). asyncpg rewords it as InvalidCachedStatementError, "
        "SQLAlchemy raises NotSupportedError and marks every statement cached on any "
        "connection of the engine as stale (a timestamp on the dialect), so only the first "
        "connection fails and the other K-1 re-prepare. psycopg has no such pool-wide step: "
        "each of the K connections fails once. "
        "With the caches off, nothing fails.",
        expected=on(
            asyncpg={
                ASYNCPG_DEFAULT: stale(lab, ASYNCPG_DEFAULT, 1, [A_CHANGED]),
                ASYNCPG_OFF: stale(lab, ASYNCPG_OFF, 0, []),
            },
            psycopg={
                PSYCOPG_DEFAULT: stale(lab, PSYCOPG_DEFAULT, k, [P_CHANGED]),
                PSYCOPG_ZERO: stale(lab, PSYCOPG_ZERO, k, [P_CHANGED]),
                PSYCOPG_OFF: stale(lab, PSYCOPG_OFF, 0, []),
            },
        ),
        observed=summaries(found),
    )
    lab.check(
        "in a transaction the error loses the request's writes, and the retry works",
        "The error aborts the transaction: the request's earlier write (its 'before' row, "
        "written with a statement no cache had seen) is rolled back with it, on every "
        "connection that failed. The retry works everywhere: asyncpg's statement was dropped "
        "by SQLAlchemy's invalidation, psycopg's by the ROLLBACK (which deallocates all of the "
        "connection's prepared statements). Neither driver nor SQLAlchemy retries by itself.",
        expected=on(
            asyncpg={ASYNCPG_DEFAULT: cost(k - 1, tries, []), ASYNCPG_OFF: cost(k, tries, [])},
            psycopg={
                PSYCOPG_DEFAULT: cost(0, tries, []),
                PSYCOPG_ZERO: cost(0, tries, []),
                PSYCOPG_OFF: cost(k, tries, []),
            },
        ),
        observed=costs(found),
    )


@run.scenario
async def alter_column_type_in_autocommit(lab: Lab[Sizes]) -> None:
    """The same migration and requests with each connection in AUTOCOMMIT
    (execution_options(isolation_level="AUTOCOMMIT")): every statement is its own
    transaction."""
    found = await rounds(lab, ALTER_COLUMN, autocommit=True)
    k, tries = lab.sizes.connections, lab.sizes.connections * lab.sizes.retries
    lab.check(
        "alter column type in autocommit: the same errors",
        "Autocommit changes nothing about who fails: the first asyncpg connection (then "
        "SQLAlchemy invalidates every cached statement of the engine), each psycopg "
        "connection. Neither driver re-prepares and retries the statement itself outside a "
        "transaction: asyncpg does that once, but only in Connection.fetch()/execute() with "
        "its own statement cache; SQLAlchemy runs PreparedStatement objects it keeps itself.",
        expected=on(
            asyncpg={
                ASYNCPG_DEFAULT: stale(lab, ASYNCPG_DEFAULT, 1, [A_CHANGED]),
                ASYNCPG_OFF: stale(lab, ASYNCPG_OFF, 0, []),
            },
            psycopg={
                PSYCOPG_DEFAULT: stale(lab, PSYCOPG_DEFAULT, k, [P_CHANGED]),
                PSYCOPG_ZERO: stale(lab, PSYCOPG_ZERO, k, [P_CHANGED]),
                PSYCOPG_OFF: stale(lab, PSYCOPG_OFF, 0, []),
            },
        ),
        observed=summaries(found),
    )
    lab.check(
        "in autocommit nothing is lost, but psycopg's stale statement never heals",
        "The earlier write stays committed. asyncpg's retries work. psycopg's do not: after "
        "the error it keeps the statement's name as prepared (a failed execution of an "
        "already prepared query is not re-checked), and in autocommit no ROLLBACK comes to "
        "clear it (rollback() on an idle connection sends nothing, the pool's reset "
        "included), so every retry on every connection fails the same way.",
        expected=on(
            asyncpg={ASYNCPG_DEFAULT: cost(k, tries, []), ASYNCPG_OFF: cost(k, tries, [])},
            psycopg={
                PSYCOPG_DEFAULT: cost(k, 0, [P_CHANGED]),
                PSYCOPG_ZERO: cost(k, 0, [P_CHANGED]),
                PSYCOPG_OFF: cost(k, tries, []),
            },
        ),
        observed=costs(found),
    )


@run.scenario
async def recreate_enum_in_a_transaction(lab: Lab[Sizes]) -> None:
    """For each configuration: warm the K connections, then the migrator recreates the
    enum type with one more label (rename the old type, create the new one, convert the
    column, drop the old type); one request per connection in a transaction, then the
    retries, as before."""
    found = await rounds(lab, RECREATE_ENUM, autocommit=False)
    k, tries = lab.sizes.connections, lab.sizes.connections * lab.sizes.retries
    lab.check(
        "recreate enum: 'cache lookup failed for type', then the transaction is aborted",
        "The warmed INSERT was prepared with its parameter typed as the old enum, which no "
        "longer exists: re-planning it fails with XX000 'cache lookup failed for type <oid>' "
        "(InternalError; asyncpg's InternalServerError, which SQLAlchemy also answers by "
        "invalidating the engine's cached statements: one failure per pool; psycopg: one "
        "per connection). "
        "The SELECT after it in the same transaction fails with 25P02 'current transaction "
        "is aborted': not a stale statement, the price of the first.",
        expected=on(
            asyncpg={
                ASYNCPG_DEFAULT: stale(lab, ASYNCPG_DEFAULT, 1, [A_ABORTED, A_LOOKUP]),
                ASYNCPG_OFF: stale(lab, ASYNCPG_OFF, 0, []),
            },
            psycopg={
                PSYCOPG_DEFAULT: stale(lab, PSYCOPG_DEFAULT, k, [P_ABORTED, P_LOOKUP]),
                PSYCOPG_ZERO: stale(lab, PSYCOPG_ZERO, k, [P_ABORTED, P_LOOKUP]),
                PSYCOPG_OFF: stale(lab, PSYCOPG_OFF, 0, []),
            },
        ),
        observed=summaries(found),
    )
    lab.check(
        "recreate enum in a transaction: writes lost where it failed, retries work",
        "As with the altered column: each failed request loses its earlier write, and "
        "the retry works on both drivers.",
        expected=on(
            asyncpg={ASYNCPG_DEFAULT: cost(k - 1, tries, []), ASYNCPG_OFF: cost(k, tries, [])},
            psycopg={
                PSYCOPG_DEFAULT: cost(0, tries, []),
                PSYCOPG_ZERO: cost(0, tries, []),
                PSYCOPG_OFF: cost(k, tries, []),
            },
        ),
        observed=costs(found),
    )


@run.scenario
async def recreate_enum_in_autocommit(lab: Lab[Sizes]) -> None:
    """The enum recreated again, the requests in AUTOCOMMIT."""
    found = await rounds(lab, RECREATE_ENUM, autocommit=True)
    k, tries = lab.sizes.connections, lab.sizes.connections * lab.sizes.retries
    lab.check(
        "recreate enum in autocommit: psycopg fails twice per connection",
        "Without a transaction to abort, the SELECT runs after the failed INSERT. With "
        "asyncpg it works (SQLAlchemy cleared the caches after the INSERT's error); with "
        "psycopg it is stale too, its result now of the new enum type (0A000 'cached plan "
        "must not change result type'): 2K errors for K connections.",
        expected=on(
            asyncpg={
                ASYNCPG_DEFAULT: stale(lab, ASYNCPG_DEFAULT, 1, [A_LOOKUP]),
                ASYNCPG_OFF: stale(lab, ASYNCPG_OFF, 0, []),
            },
            psycopg={
                PSYCOPG_DEFAULT: stale(lab, PSYCOPG_DEFAULT, 2 * k, [P_CHANGED, P_LOOKUP]),
                PSYCOPG_ZERO: stale(lab, PSYCOPG_ZERO, 2 * k, [P_CHANGED, P_LOOKUP]),
                PSYCOPG_OFF: stale(lab, PSYCOPG_OFF, 0, []),
            },
        ),
        observed=summaries(found),
    )
    lab.check(
        "recreate enum in autocommit: nothing lost, psycopg never heals",
        "The earlier writes stay. asyncpg's retries work; psycopg's keep failing at the "
        "INSERT ('cache lookup failed for type') on every connection, for the same reason as "
        "after the altered column.",
        expected=on(
            asyncpg={ASYNCPG_DEFAULT: cost(k, tries, []), ASYNCPG_OFF: cost(k, tries, [])},
            psycopg={
                PSYCOPG_DEFAULT: cost(k, 0, [P_LOOKUP]),
                PSYCOPG_ZERO: cost(k, 0, [P_LOOKUP]),
                PSYCOPG_OFF: cost(k, tries, []),
            },
        ),
        observed=costs(found),
    )
