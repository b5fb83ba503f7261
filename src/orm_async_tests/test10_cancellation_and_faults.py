"""When a query is cancelled (asyncio.timeout), times out on the server
(statement_timeout) or loses its backend (pg_terminate_backend), is the query
really gone, what happens to the connection, does the pool serve the next
request — with and without pool_pre_ping — and is any committed row lost?

A request handler gives up on a slow query (``asyncio.timeout``), the server
gives up on it (``statement_timeout``), or an administrator kills pooled
connections (``pg_terminate_backend``). Each time the questions are the same:
is the query really gone on the server, what did the driver and SQLAlchemy do
with the connection, does the pool serve the next request, and is any
committed row lost (or any row of the interrupted transaction kept)?

Every fault runs on its own small engine (``lab.one_connection``,
``lab.unpooled``, ``lab.engine_with``) whose connections carry their own
``application_name`` (``<tag>cancel``, ``<tag>kill-noping``...), so
``pg_stat_activity`` shows exactly that engine's backends and the shared pool
is never touched. Around each fault the scenarios commit rows and flush rows
in the doomed transaction, and record both in a ledger (what the application
believes was committed); the last scenario counts the rows in the table and
compares the two.

Sources: asyncio docs, "Timeouts" (``asyncio.timeout`` cancels the task and
turns the ``CancelledError`` into ``TimeoutError``) and "Task Cancellation";
asyncpg docs, ``connect(command_timeout=...)`` and ``Connection.terminate``
(on a timeout or a cancellation asyncpg sends PostgreSQL a CancelRequest);
SQLAlchemy docs, "Connection Pooling" — "Dealing with Disconnects"
(pessimistic ``pool_pre_ping``; optimistic handling: a disconnect error
invalidates the connection and every pooled connection older than it) and
"More on Invalidation"; SQLAlchemy issues #6592 (connections not invalidated on
asyncio exceptions), #8145/#8419 (cancelled tasks: connections terminated instead
of leaked), #10717 (``command_timeout`` left the query running on the server
until terminate() became a graceful close) and #11821 (``CancelledError``
during terminate); asyncpg issues #1310 and #1356 (the cancel path can raise or
wait after the server is gone); psycopg 3 source, ``AsyncConnection.wait``
(an asyncio cancellation of a running query makes psycopg send a cancel request
with ``cancel_safe`` and wait, up to 5 s, for the query to end before re-raising;
issues #1371, #1435) and docs, "Connection classes" (``info.backend_pid``,
``info.transaction_status``); PostgreSQL docs, ``statement_timeout`` (client
connection defaults; SQLSTATE 57014 ``query_canceled``), ``SET LOCAL`` (lasts
until the end of the transaction) and ``pg_terminate_backend(pid, timeout)``
(server signaling functions).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import exc, func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from .lab import (
    BadSizes,
    Lab,
    at_least,
    describe,
    driver_error,
    experiment,
    first_line,
    matches,
    not_,
    on,
    one_of,
    outcome,
    prefix,
    probes,
    sqlstate,
)
from .lab.probes import checked_out, queue_pool
from .models import User

BOUND = 5.0
"""Upper bound (s) of every wait in this module: a hang becomes a failed check."""


@dataclass(frozen=True)
class Sizes:
    rows: int = 3
    """Rows committed before and after each fault, and flushed in each doomed transaction."""
    cancel_after: float = 0.3
    """Seconds before asyncio.timeout (and asyncpg's command_timeout) give up."""
    long_sleep: float = 10.0
    """Seconds of the pg_sleep that is cancelled or timed out."""
    statement_timeout_ms: int = 200
    """The server's statement_timeout, in milliseconds."""
    slow: float = 0.3
    """Seconds of a statement longer than statement_timeout that must still run to its end
    once the timeout is lifted."""

    def __post_init__(self) -> None:
        if self.rows < 1:
            raise BadSizes(f"rows ({self.rows}) must be at least 1: the ledger needs rows")
        if not 0 < self.cancel_after < min(self.long_sleep, BOUND):
            raise BadSizes(
                f"cancel_after ({self.cancel_after:g} s) must be above 0 and below long_sleep "
                f"({self.long_sleep:g} s) and {BOUND:g} s, or nothing is cancelled"
            )
        timeout = self.statement_timeout_ms / 1000
        if not 0 < timeout < min(self.slow, self.long_sleep, BOUND):
            raise BadSizes(
                f"statement_timeout_ms ({self.statement_timeout_ms}) must be above 0 and below "
                f"slow ({self.slow:g} s), long_sleep ({self.long_sleep:g} s) and {BOUND:g} s, "
                "or no statement times out"
            )


run = experiment(10, "Cancellation, timeouts and faults", Sizes)


# ---------------------------------------------------------------- small helpers


def error_chain(err: BaseException) -> str:
    """``DBAPIError ← asyncpg QueryCanceledError [57014]: message`` (what wraps what)."""
    driver: BaseException | None = driver_error(err)
    driver = None if driver is err else driver
    state = sqlstate(err)
    names = [type(err).__name__]
    if driver is not None:
        names.append(f"{type(driver).__module__.split('.')[0]} {type(driver).__name__}")
    message = first_line(driver if driver is not None else err)
    shown = f" [{state}]" if state else ""
    return f"{' ← '.join(names)}{shown}: {message}"


async def sql_outcome(awaitable: Awaitable[Any]) -> str:
    """Like :func:`outcome`, with the driver class and SQLSTATE of a database error."""
    try:
        await awaitable
    except exc.DBAPIError as err:
        return error_chain(err)
    except Exception as err:
        return describe(err)
    return "ok"


@dataclass
class Attempt:
    """One request on a pool after a fault: ``ok`` or the error, and the backend used."""

    result: str
    pid: int | None = None
    invalidated: bool | None = None


async def one_request(sessions: async_sessionmaker[AsyncSession]) -> Attempt:
    try:
        async with asyncio.timeout(BOUND), sessions.begin() as session:
            pid = await probes.backend_pid(session)
    except exc.DBAPIError as err:
        return Attempt(error_chain(err), None, err.connection_invalidated)
    except Exception as err:
        return Attempt(describe(err))
    return Attempt("ok", pid)


def one_connection(
    lab: Lab[Sizes], app: str, **overrides: Any
) -> tuple[AsyncEngine, async_sessionmaker[AsyncSession]]:
    """An engine of one pooled connection, its backend named ``app``; no pre-ping unless
    ``overrides`` (engine options) say otherwise."""
    engine = lab.one_connection(application_name=app, **({"pool_pre_ping": False} | overrides))
    return engine, lab.sessions_on(engine)


# ---------------------------------------------------------------- the ledger


def label_of(tag: str, username: str) -> str:
    """``<tag><label>-<i>`` → ``<label>``: which commit (or doomed flush) a row came from."""
    return username.removeprefix(tag).rpartition("-")[0]


@dataclass
class Ledger:
    """What the application believes: rows committed (by label: they must all be in the
    table at the end) and labels of rows flushed in an interrupted transaction (must not)."""

    tag: str
    rows: int
    committed: Counter[str] = field(default_factory=Counter)
    interrupted: list[str] = field(default_factory=list)

    def names(self, label: str) -> list[str]:
        return [f"{self.tag}{label}-{i}" for i in range(self.rows)]

    async def commit(self, sessions: async_sessionmaker[AsyncSession], label: str) -> None:
        """Commit ``rows`` users in a transaction of their own (they must survive)."""
        async with sessions.begin() as session:
            session.add_all(User(username=name) for name in self.names(label))
        self.committed[label] += self.rows  # once the COMMIT succeeded

    async def flush_doomed(self, session: AsyncSession, label: str) -> None:
        """Flush ``rows`` users in ``session``'s transaction, which is about to be interrupted."""
        self.interrupted.append(label)
        session.add_all(User(username=name) for name in self.names(label))
        await session.flush()


@asynccontextmanager
async def ledger(lab: Lab[Sizes]) -> AsyncIterator[Ledger]:
    """One ledger for every fault scenario; the last scenario audits it against the table."""
    yield Ledger(lab.tag, lab.sizes.rows)


# ---------------------------------------------------------------- the scenarios


@run.scenario
async def asyncio_timeout_in_a_session(lab: Lab[Sizes]) -> None:
    """asyncio.timeout around a long pg_sleep inside an ORM transaction, on a
    one-connection engine without pre-ping; then the same session and the next one."""
    size = lab.sizes
    book = await lab.use(ledger)
    app = lab.name("cancel")
    engine, sessions = one_connection(lab, app)
    invalidations = probes.Invalidations.on(engine)
    await book.commit(sessions, "before-cancel")

    async with sessions() as session:
        pid = await probes.backend_pid(session)
        await book.flush_doomed(session, "cancelled")
        sampler = probes.sleepers_sampler(lab.engine, app, every=0.01, within=BOUND)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(size.cancel_after):
                await session.execute(select(func.pg_sleep(size.long_sleep)))
            raised = "no error"
        except TimeoutError as err:
            raised = describe(err).rstrip(": ")
        finally:
            sleeping = await sampler.stop()
        lab.figure("asyncio.timeout: TimeoutError after", time.perf_counter() - started, "s")
        out_while_open = checked_out(engine)
        still_in_transaction = session.in_transaction()
        reuse = await outcome(session.execute(select(1)))
        await session.rollback()
        pid_after_rollback = await probes.backend_pid(session)

    gone = await probes.wait_sleepers(lab.engine, app, lambda n: n == 0, within=BOUND)
    remaining, seconds = gone.value, gone.seconds
    lab.figure("asyncio.timeout: pg_sleep gone from pg_stat_activity after", seconds, "s")
    old_alive = await probes.live_pids(lab.engine, [pid])
    after = await one_request(sessions)
    await book.commit(sessions, "after-cancel")

    lab.check(
        "asyncio.timeout: the caller gets TimeoutError",
        "asyncio.timeout cancels the task awaiting session.execute(pg_sleep) — while the "
        "server was running it — and turns the CancelledError into TimeoutError.",
        expected={"raised": "TimeoutError", "most backends seen in pg_sleep before": at_least(1)},
        observed={"raised": raised, "most backends seen in pg_sleep before": probes.peak(sleeping)},
    )
    lab.check(
        "asyncio.timeout: the server-side query is gone",
        f"After the TimeoutError no backend of the app is still running pg_sleep (polled "
        f"up to {BOUND:.0f} s): cancelling the Python task does stop the query on the server, "
        "on both drivers (each sends a CancelRequest, see the next scenario; SQLAlchemy "
        "closes the connection as well).",
        expected={"backends in pg_sleep": 0},
        observed={"backends in pg_sleep": remaining},
    )
    lab.check(
        "asyncio.timeout: SQLAlchemy invalidates the cancelled connection",
        "SQLAlchemy treats a CancelledError/TimeoutError during execute as a disconnect: "
        "it invalidates that connection at once (pool 'invalidate' event, the backend "
        "process exits), so it is never returned to the pool half-way through a query — "
        "nothing stays checked out even while the session is still open.",
        expected={
            "pool invalidate events": ["CancelledError"],
            "old backend still in pg_stat_activity": [],
            "checked out while the session is open": 0,
        },
        observed={
            "pool invalidate events": invalidations.seen,
            "old backend still in pg_stat_activity": old_alive,
            "checked out while the session is open": out_while_open,
        },
    )
    lab.check(
        "asyncio.timeout: the session must be rolled back",
        "The session still has its (now invalid) transaction: the next statement on it "
        "raises PendingRollbackError; after await session.rollback() it works again, on a "
        "new connection.",
        expected={
            "in transaction": True,
            "next statement": prefix("PendingRollbackError"),
            "backend after rollback": not_(one_of(pid, 0)),
        },
        observed={
            "in transaction": still_in_transaction,
            "next statement": reuse,
            "backend after rollback": pid_after_rollback,
        },
    )
    lab.check(
        "asyncio.timeout: the pool serves the next request",
        "Without pre-ping, the next session on the same one-connection pool works at once "
        "(on a fresh backend) and nothing is left checked out.",
        expected={"next request": "ok", "its backend": not_(pid), "checked out": 0},
        observed={
            "next request": after.result,
            "its backend": after.pid,
            "checked out": checked_out(engine),
        },
    )


async def state_change(engine: AsyncEngine, pid: int) -> float | None:
    """When (epoch seconds, the server's clock) backend ``pid`` last changed state — for a
    backend no longer running its query, when that query ended — or ``None`` if it is gone.
    The server runs on this host (embedded, or 127.0.0.1), so it shares ``time.time()``'s
    clock."""
    async with engine.connect() as conn:
        found = await conn.scalar(
            text("SELECT extract(epoch FROM state_change) FROM pg_stat_activity WHERE pid = :pid"),
            {"pid": pid},
        )
    return None if found is None else float(found)


@dataclass
class Bare:
    """The driver's own connection below SQLAlchemy (``driver_connection``): asyncpg's
    ``Connection`` or psycopg's ``AsyncConnection``, each through its own API."""

    driver: str
    conn: Any

    def pid(self) -> int:
        """The backend's PID as the driver knows it (no query)."""
        if self.driver == "asyncpg":
            return int(self.conn.get_server_pid())
        return int(self.conn.info.backend_pid)

    async def sleep(self, seconds: float) -> None:
        if self.driver == "asyncpg":
            await self.conn.fetchval("SELECT pg_sleep($1)", seconds)
        else:
            await self.conn.execute("SELECT pg_sleep(%s)", [seconds])

    def transaction(self) -> str:
        """The driver's transaction status: psycopg's ``info.transaction_status`` name;
        asyncpg tells only whether it is in a transaction (INTRANS) or not (IDLE)."""
        if self.driver == "asyncpg":
            return "INTRANS" if self.conn.is_in_transaction() else "IDLE"
        return str(self.conn.info.transaction_status.name)

    async def rollback(self) -> None:
        """End psycopg's implicit transaction (asyncpg outside a transaction has none)."""
        if self.driver != "asyncpg":
            await self.conn.rollback()

    async def query_pid(self) -> int:
        if self.driver == "asyncpg":
            return int(await self.conn.fetchval("SELECT pg_backend_pid()"))
        row = await (await self.conn.execute("SELECT pg_backend_pid()")).fetchone()
        return int(row[0])

    def closed(self) -> bool:
        if self.driver == "asyncpg":
            return bool(self.conn.is_closed())
        return bool(self.conn.closed)


@run.scenario
async def asyncio_timeout_in_the_driver_alone(lab: Lab[Sizes]) -> None:
    """The same cancellation on the bare driver connection, below SQLAlchemy (an unpooled
    engine, its driver connection used directly: asyncpg's Connection, or psycopg's
    AsyncConnection on psycopg)."""
    size = lab.sizes
    app = lab.name("raw")
    engine = lab.unpooled(application_name=app)
    async with engine.connect() as conn:
        raw = await conn.get_raw_connection()
        bare = Bare(lab.cell.driver, raw.driver_connection)
        pid = bare.pid()
        sampler = probes.sleepers_sampler(lab.engine, app, every=0.01, within=BOUND)
        started = time.perf_counter()
        raised_at: float | None = None
        try:
            async with asyncio.timeout(size.cancel_after):
                await bare.sleep(size.long_sleep)
            raised = "no error"
        except TimeoutError as err:
            raised_at = time.time()  # before any await: nothing else has run since
            raised = describe(err).rstrip(": ")
        finally:
            sleeping = await sampler.stop()
        lab.figure("driver alone: TimeoutError after", time.perf_counter() - started, "s")
        status = bare.transaction()
        gone = await probes.wait_sleepers(lab.engine, app, lambda n: n == 0, within=BOUND)
        remaining, seconds = gone.value, gone.seconds
        ended_at = await state_change(lab.engine, pid)  # before the next statement moves it
        order = "unknown"
        if raised_at is not None and ended_at is not None:
            order = "before" if ended_at < raised_at else "after"
            lab.figure(
                "driver alone: query ended minus TimeoutError", 1000 * (ended_at - raised_at), "ms"
            )
        async with asyncio.timeout(BOUND):
            await bare.rollback()
            pid_after = await bare.query_pid()
        closed = bare.closed()
    lab.figure("driver alone: pg_sleep gone after", seconds, "s")
    lab.check(
        "driver alone: a cancelled query is cancelled, the connection kept",
        "Below SQLAlchemy, both drivers answer the task cancellation with a PostgreSQL "
        "CancelRequest: the query stops on the server while the connection stays open and "
        "usable on the same backend — closing it is SQLAlchemy's decision. They differ in "
        "when: asyncpg lets the CancelledError (TimeoutError) through at once and sends the "
        "CancelRequest in the background (its next query waits for it), so the query is "
        "still running when the caller gets the TimeoutError; psycopg's AsyncConnection "
        "catches the CancelledError, sends the CancelRequest (cancel_safe) and waits for "
        "the server's 57014 before re-raising, so the query is already gone. And psycopg "
        "ran the query in its implicit transaction (autocommit off, as SQLAlchemy leaves "
        "it), which the cancel leaves aborted (INERROR) until a rollback; asyncpg has no "
        "transaction open.",
        expected={
            "raised": "TimeoutError",
            "most backends seen in pg_sleep before": at_least(1),
            "the query ended on the server, relative to the TimeoutError": on(
                asyncpg="after", psycopg="before"
            ),
            "transaction status after": on(asyncpg="IDLE", psycopg="INERROR"),
            "backends in pg_sleep": 0,
            "connection closed": False,
            "backend after": pid,
        },
        observed={
            "raised": raised,
            "most backends seen in pg_sleep before": probes.peak(sleeping),
            "the query ended on the server, relative to the TimeoutError": order,
            "transaction status after": status,
            "backends in pg_sleep": remaining,
            "connection closed": closed,
            "backend after": pid_after,
        },
    )


@run.scenario
async def asyncpg_command_timeout(lab: Lab[Sizes]) -> None:
    """asyncpg's own command_timeout (a connect argument, cancel_after seconds) on a
    one-connection engine, around a long pg_sleep in an ORM transaction."""
    lab.only_on(
        "asyncpg",
        "command_timeout is an asyncpg connect argument (psycopg refuses it as an invalid "
        "connection option and has no client-side per-statement timeout of its own: "
        "statement_timeout, below, is the server-side one both drivers share)",
    )
    size = lab.sizes
    book = await lab.use(ledger)
    app = lab.name("cmdtimeout")
    engine, sessions = one_connection(lab, app, driver_args={"command_timeout": size.cancel_after})
    invalidations = probes.Invalidations.on(engine)
    await book.commit(sessions, "before-command-timeout")
    async with sessions() as session:
        pid = await probes.backend_pid(session)
        await book.flush_doomed(session, "command-timed-out")
        wrapped = False
        sampler = probes.sleepers_sampler(lab.engine, app, every=0.01, within=BOUND)
        try:
            async with asyncio.timeout(BOUND):
                await session.execute(select(func.pg_sleep(size.long_sleep)))
            raised = "no error"
        except Exception as err:
            raised = describe(err).rstrip(": ")
            wrapped = isinstance(err, exc.SQLAlchemyError)
        finally:
            sleeping = await sampler.stop()
        await session.rollback()
    remaining = (await probes.wait_sleepers(lab.engine, app, lambda n: n == 0, within=BOUND)).value
    old_alive = await probes.live_pids(lab.engine, [pid])
    after = await one_request(sessions)
    lab.check(
        "command_timeout: a bare TimeoutError, and the connection is invalidated",
        "asyncpg's command_timeout raises TimeoutError, which SQLAlchemy does not wrap in a "
        "DBAPIError and handles like a cancellation: the connection is invalidated (its "
        "backend exits, the query with it: issue #10717 was a query left running here), and "
        "the next request gets a new connection.",
        expected={
            "raised": "TimeoutError",
            "wrapped in a SQLAlchemy error": False,
            "pool invalidate events": ["TimeoutError"],
            "most backends seen in pg_sleep before": at_least(1),
            "backends in pg_sleep": 0,
            "old backend still in pg_stat_activity": [],
            "next request": "ok",
            "its backend": not_(pid),
        },
        observed={
            "raised": raised,
            "wrapped in a SQLAlchemy error": wrapped,
            "pool invalidate events": invalidations.seen,
            "most backends seen in pg_sleep before": probes.peak(sleeping),
            "backends in pg_sleep": remaining,
            "old backend still in pg_stat_activity": old_alive,
            "next request": after.result,
            "its backend": after.pid,
        },
    )


@run.scenario
async def statement_timeout_for_an_engine(lab: Lab[Sizes]) -> None:
    """statement_timeout for every connection of a one-connection engine (a startup server
    setting), a long pg_sleep in an ORM transaction; then SET LOCAL statement_timeout = 0."""
    size = lab.sizes
    book = await lab.use(ledger)
    timeout = f"{size.statement_timeout_ms}ms"
    app = lab.name("stmt")
    engine, sessions = one_connection(
        lab, app, server_settings={"statement_timeout": str(size.statement_timeout_ms)}
    )
    invalidations = probes.Invalidations.on(engine)
    await book.commit(sessions, "before-statement-timeout")

    async with sessions() as session:
        shown = await session.scalar(text("SHOW statement_timeout"))
        pid = await probes.backend_pid(session)
        await book.flush_doomed(session, "statement-timed-out")
        error: exc.DBAPIError | None = None
        started = time.perf_counter()
        try:
            async with asyncio.timeout(BOUND):
                await session.execute(select(func.pg_sleep(size.long_sleep)))
            raised = "no error"
        except exc.DBAPIError as err:
            error = err
            raised = error_chain(err)
        except TimeoutError:
            raised = f"no server error within {BOUND:.0f} s"
        lab.figure("statement_timeout: error after", time.perf_counter() - started, "s")
        next_in_transaction = await sql_outcome(session.execute(select(1)))
        await session.rollback()
        pid_after = await probes.backend_pid(session)
        await session.commit()
        await book.commit(sessions, "after-statement-timeout")

        # the connection default can be lifted for one transaction
        await session.execute(text("SET LOCAL statement_timeout = 0"))
        lifted = await outcome(session.execute(select(func.pg_sleep(size.slow))))
        await session.commit()
        shown_again = await session.scalar(text("SHOW statement_timeout"))
        await session.commit()

    lab.check(
        "statement_timeout (server_settings): the server cancels the statement",
        "statement_timeout given at connection startup (asyncpg's server_settings, psycopg's "
        "options=-c) is the session default of every connection of the engine; a longer "
        "statement fails with SQLSTATE 57014 'canceling statement due to statement timeout'. "
        "The wrapper differs by driver: on asyncpg SQLAlchemy raises a plain DBAPIError "
        "around QueryCanceledError (its asyncpg adapter maps PostgresError to the generic "
        "DBAPI Error); on psycopg an OperationalError around errors.QueryCanceled, which "
        "psycopg itself makes a subclass of OperationalError, as the DBAPI classes it.",
        expected={
            "SHOW statement_timeout": timeout,
            "SQLSTATE": "57014",
            "error": on(
                asyncpg=matches(
                    r"^DBAPIError ← asyncpg QueryCanceledError \[57014\]: .*statement timeout"
                ),
                psycopg=matches(
                    r"^OperationalError ← psycopg QueryCanceled \[57014\]: .*statement timeout"
                ),
            ),
        },
        observed={
            "SHOW statement_timeout": shown,
            "SQLSTATE": sqlstate(error) if error is not None else None,
            "error": raised,
        },
    )
    lab.check(
        "statement_timeout: the connection stays usable",
        "A server-side timeout is an ordinary SQL error, not a disconnect: the connection is "
        "not invalidated, the rest of the transaction is refused (25P02 'current transaction "
        "is aborted') until rollback, after which the same backend carries on. Only the "
        "wrapping differs: asyncpg's InFailedSQLTransactionError comes as a plain DBAPIError, "
        "psycopg's InFailedSqlTransaction as an InternalError (its DBAPI class).",
        expected={
            "connection_invalidated": False,
            "pool invalidate events": [],
            "next statement": on(
                asyncpg=prefix("DBAPIError ← asyncpg InFailedSQLTransactionError [25P02]"),
                psycopg=prefix("InternalError ← psycopg InFailedSqlTransaction [25P02]"),
            ),
            "backend after rollback": pid,
            "checked out": 0,
        },
        observed={
            "connection_invalidated": None if error is None else error.connection_invalidated,
            "pool invalidate events": invalidations.seen,
            "next statement": next_in_transaction,
            "backend after rollback": pid_after,
            "checked out": checked_out(engine),
        },
    )
    lab.check(
        "statement_timeout: SET LOCAL lifts the default for one transaction",
        f"SET LOCAL statement_timeout = 0 lets one transaction run a {size.slow:g} s statement "
        f"on that engine; the next transaction has the {timeout} default again.",
        expected={"with SET LOCAL statement_timeout = 0": "ok", "then SHOW": timeout},
        observed={"with SET LOCAL statement_timeout = 0": lifted, "then SHOW": shown_again},
    )


@run.scenario
async def set_local_statement_timeout(lab: Lab[Sizes]) -> None:
    """SET LOCAL statement_timeout inside one transaction of a one-connection engine with
    the server's default; then the same statement in the next transaction."""
    size = lab.sizes
    book = await lab.use(ledger)
    timeout = f"{size.statement_timeout_ms}ms"
    _, sessions = one_connection(lab, lab.name("local"))
    async with sessions() as session:
        pid = await probes.backend_pid(session)
        default = await session.scalar(text("SHOW statement_timeout"))
        await session.execute(text(f"SET LOCAL statement_timeout = '{timeout}'"))
        inside = await session.scalar(text("SHOW statement_timeout"))
        await book.flush_doomed(session, "set-local-timed-out")
        try:
            async with asyncio.timeout(BOUND):
                await session.execute(select(func.pg_sleep(size.slow)))
            first = "no error"
        except exc.DBAPIError as err:
            first = sqlstate(err) or error_chain(err)
        except TimeoutError:
            first = f"no server error within {BOUND:.0f} s"
        await session.rollback()

        later = await session.scalar(text("SHOW statement_timeout"))
        started = time.perf_counter()
        second = await outcome(session.execute(select(func.pg_sleep(size.slow))))
        seconds = time.perf_counter() - started
        lab.figure(f"SET LOCAL: the next transaction's pg_sleep({size.slow:g})", seconds, "s")
        await session.commit()
        pid_after = await probes.backend_pid(session)
        await session.commit()
    await book.commit(sessions, "after-set-local")
    lab.check(
        "SET LOCAL statement_timeout: only that transaction",
        f"SET LOCAL statement_timeout = '{timeout}' cancels a {size.slow:g} s statement in "
        "its transaction (57014); the next transaction on the same connection is back to "
        "the server's default and runs the same statement to the end.",
        expected={
            "inside: SHOW": timeout,
            "inside: the statement": "57014",
            "next transaction: SHOW": default,
            "next transaction: the statement": "ok",
            "next transaction: backend": pid,
        },
        observed={
            "inside: SHOW": inside,
            "inside: the statement": first,
            "next transaction: SHOW": later,
            "next transaction: the statement": second,
            "next transaction: backend": pid_after,
        },
    )


@dataclass
class Killed:
    """What pg_terminate_backend on a pool's idle connections led to."""

    pooled: int
    server_pids: list[int]
    terminated: list[bool]
    survivors: list[int]
    attempts: list[Attempt]
    invalidations: probes.Invalidations
    checked_out: int

    def used_killed(self, attempts: list[Attempt]) -> list[int]:
        """The killed backends that served any of ``attempts`` (none should)."""
        return sorted({a.pid for a in attempts if a.pid is not None} & set(self.server_pids))


async def terminate_pooled(lab: Lab[Sizes], *, pre_ping: bool) -> Killed:
    """Kill every idle pooled connection of a two-connection engine, then use it again."""
    book = await lab.use(ledger)
    variant = "ping" if pre_ping else "noping"
    app = lab.name(f"kill-{variant}")
    engine = lab.engine_with(
        application_name=app,
        pool_size=2,
        max_overflow=0,
        pool_timeout=BOUND,
        pool_pre_ping=pre_ping,
    )
    sessions = lab.sessions_on(engine)
    invalidations = probes.Invalidations.on(engine)
    await book.commit(sessions, f"before-kill-{variant}")
    async with sessions() as first, sessions() as second:  # both connections at once
        await probes.backend_pid(first)
        await probes.backend_pid(second)
    pooled = queue_pool(engine).checkedin()
    server_pids = await probes.backend_pids(lab.engine, app)
    terminated = [await probes.terminate(lab.engine, pid, wait=BOUND) for pid in server_pids]
    survivors = await probes.live_pids(lab.engine, server_pids)
    attempts = [await one_request(sessions) for _ in range(3)]
    await book.commit(sessions, f"after-kill-{variant}")
    killed = Killed(
        pooled, server_pids, terminated, survivors, attempts, invalidations, checked_out(engine)
    )
    lab.check(
        "pg_terminate_backend: both pooled connections killed",
        "The engine's pool held its 2 idle connections; pg_terminate_backend(pid, timeout) "
        "killed both backends and they are gone from pg_stat_activity.",
        expected={
            "pooled idle connections": 2,
            "terminated": [True, True],
            "left in pg_stat_activity": [],
        },
        observed={
            "pooled idle connections": killed.pooled,
            "terminated": killed.terminated,
            "left in pg_stat_activity": killed.survivors,
        },
    )
    return killed


@run.scenario
async def terminate_pooled_without_pre_ping(lab: Lab[Sizes]) -> None:
    """pg_terminate_backend on both idle connections of a two-connection pool without
    pre-ping, then three requests in a row."""
    killed = await terminate_pooled(lab, pre_ping=False)
    first, then = killed.attempts[0], killed.attempts[1:]
    lab.check(
        "without pool_pre_ping: the next checkout fails, then the pool recovers",
        "The pool hands out a dead connection: the first request fails with a disconnect "
        "error (connection_invalidated=True). That one error invalidates the connection and "
        "every pooled one older than it (one pool invalidate event for both), so the "
        "following requests work on new backends. The error differs by driver: asyncpg "
        "reads its socket even while idle, so it has already seen the server close it and "
        "refuses to send anything (InterfaceError 'connection is closed'); psycopg reads "
        "only when it runs a statement, so it sends one and then reads what the server "
        "wrote before closing: the FATAL 57P01 'terminating connection due to administrator "
        "command', raised as errors.AdminShutdown (an OperationalError), which leaves the "
        "connection broken, the test SQLAlchemy's psycopg dialect uses for a disconnect.",
        expected={
            "1st request": on(
                asyncpg=prefix("InterfaceError ← asyncpg InterfaceError: connection is closed"),
                psycopg=prefix("OperationalError ← psycopg AdminShutdown [57P01]: terminating"),
            ),
            "1st: connection_invalidated": True,
            "then": ["ok", "ok"],
            "killed backends that served them": [],
            "pool invalidate events": on(asyncpg=["InterfaceError"], psycopg=["AdminShutdown"]),
            "checked out": 0,
        },
        observed={
            "1st request": first.result,
            "1st: connection_invalidated": first.invalidated,
            "then": [a.result for a in then],
            "killed backends that served them": killed.used_killed(then),
            "pool invalidate events": killed.invalidations.seen,
            "checked out": killed.checked_out,
        },
    )


@run.scenario
async def terminate_pooled_with_pre_ping(lab: Lab[Sizes]) -> None:
    """The same with pool_pre_ping on."""
    killed = await terminate_pooled(lab, pre_ping=True)
    lab.check(
        "with pool_pre_ping: the pool recovers without an error",
        "With pre-ping each checkout first pings the connection (pessimistic disconnect "
        "handling): the failed ping raises InvalidatePoolError inside the pool, which "
        "replaces that connection and invalidates every pooled one older than it, so no "
        "request sees an error and every one runs on a new backend.",
        expected={
            "requests": ["ok", "ok", "ok"],
            "killed backends that served them": [],
            "pool invalidate events": ["InvalidatePoolError"],
            "checked out": 0,
        },
        observed={
            "requests": [a.result for a in killed.attempts],
            "killed backends that served them": killed.used_killed(killed.attempts),
            "pool invalidate events": killed.invalidations.seen,
            "checked out": killed.checked_out,
        },
    )


@run.scenario
async def killed_mid_transaction(lab: Lab[Sizes]) -> None:
    """The backend of a checked-out connection (pre-ping on) is killed between flush and
    commit."""
    book = await lab.use(ledger)
    # pre-ping on, explicitly (not DB_PRE_PING's default): the claim is that it cannot help
    engine, sessions = one_connection(lab, lab.name("kill-midway"), pool_pre_ping=True)
    async with sessions() as session:
        pid = await probes.backend_pid(session)
        await book.flush_doomed(session, "killed-mid-way")
        killed = await probes.terminate(lab.engine, pid, wait=BOUND)
        commit = "no error"
        invalidated: bool | None = None
        try:
            async with asyncio.timeout(BOUND):
                await session.commit()
        except exc.DBAPIError as err:
            commit = error_chain(err)
            invalidated = err.connection_invalidated
        except Exception as err:
            commit = describe(err)
    after = await one_request(sessions)
    await book.commit(sessions, "after-kill-midway")
    lab.check(
        "killed mid-transaction: pre-ping cannot help, the commit fails",
        "Pre-ping (on here) only tests a connection at checkout: when the backend of a "
        "checked-out connection is killed between flush and commit, the commit fails with a "
        "disconnect error; the pool then serves the next request. As without pre-ping, "
        "asyncpg has already noticed the closed socket (InterfaceError: the underlying "
        "connection is closed) while psycopg sends the COMMIT and gets the server's FATAL "
        "57P01 (OperationalError around errors.AdminShutdown).",
        expected={
            "backend killed": True,
            "commit": on(
                asyncpg=matches(
                    r"^InterfaceError ← asyncpg InterfaceError: .*connection is closed"
                ),
                psycopg=prefix("OperationalError ← psycopg AdminShutdown [57P01]: terminating"),
            ),
            "connection_invalidated": True,
            "next request": "ok",
            "checked out": 0,
        },
        observed={
            "backend killed": killed,
            "commit": commit,
            "connection_invalidated": invalidated,
            "next request": after.result,
            "checked out": checked_out(engine),
        },
    )


@run.scenario
async def no_row_lost_or_kept(lab: Lab[Sizes]) -> None:
    """Count the run's rows in the table, by the commit (or doomed flush) they came from,
    and compare with the ledger the fault scenarios kept."""
    book = await lab.use(ledger)
    if not book.committed:
        lab.skip("no fault scenario ran before this one: the ledger is empty")
    async with lab.sessions() as session:
        rows = await session.execute(
            select(User.username, func.count())
            .where(User.username.startswith(lab.tag))
            .group_by(User.username)
        )
        in_table: Counter[str] = Counter()
        for username, count in rows:
            in_table[label_of(lab.tag, username)] += count
    lab.check(
        "no committed row is lost",
        "Every row committed before, between and after the faults is in the table, each "
        "exactly once: the rows counted in the table, by commit, are the rows the "
        "application recorded as committed.",
        expected=dict(book.committed),
        observed={label: in_table[label] for label in book.committed},
    )
    known = {*book.committed, *book.interrupted}
    lab.check(
        "interrupted transactions leave nothing behind",
        "Rows flushed in a transaction that was cancelled, timed out or lost its backend are "
        "not in the table: each interrupted transaction was rolled back as a whole; the table "
        "holds no row of this run that the application did not record as committed.",
        expected={**dict.fromkeys(book.interrupted, 0), "rows of no recorded commit": {}},
        observed={
            **{label: in_table[label] for label in book.interrupted},
            "rows of no recorded commit": {
                label: n for label, n in sorted(in_table.items()) if label not in known
            },
        },
    )
