"""Experiment 10: cancellation, timeouts and faults.

A request handler gives up on a slow query (``asyncio.timeout``), the server
gives up on it (``statement_timeout``), or an administrator kills pooled
connections (``pg_terminate_backend``). Each time the questions are the same:
is the query really gone on the server, what did the driver and SQLAlchemy do
with the connection, does the pool serve the next request, and is any
committed row lost (or any row of the interrupted transaction kept)?

Every fault runs on its own small engine (``lab.engine_with``) whose
connections carry their own ``application_name`` (``<tag>cancel``,
``<tag>kill-noping``...), so ``pg_stat_activity`` shows exactly that engine's
backends and the shared pool is never touched.

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
wait after the server is gone); PostgreSQL docs, ``statement_timeout`` (client
connection defaults; SQLSTATE 57014 ``query_canceled``), ``SET LOCAL`` (lasts
until the end of the transaction) and ``pg_terminate_backend(pid, timeout)``
(server signaling functions).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import event, exc, func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.pool import NullPool

from . import probes
from .db import create_session_factory
from .harness import Lab, describe, experiment, first_line, outcome, sqlstate
from .models import User
from .probes import checked_out, queue_pool

BOUND = 5.0
"""Upper bound (s) of every wait in this module: a hang becomes a failed check."""


# ---------------------------------------------------------------- small helpers


async def backend_pid(session: AsyncSession) -> int:
    return int(await session.scalar(select(func.pg_backend_pid())) or 0)


async def no_sleepers(lab: Lab, app: str) -> tuple[int, float]:
    """Poll (bounded) until no backend of ``app`` runs pg_sleep: (how many still do, seconds)."""
    found = await probes.poll(
        lambda: probes.sleepers(lab.engine, app), lambda n: n == 0, within=BOUND, every=0.02
    )
    return found.value, found.seconds


@dataclass
class Invalidations:
    """Exceptions the pool's ``invalidate`` event reported (one per invalidated connection)."""

    seen: list[str] = field(default_factory=list)

    @classmethod
    def on(cls, engine: AsyncEngine) -> Invalidations:
        found = cls()

        def record(dbapi_connection: Any, record: Any, exception: BaseException | None) -> None:
            found.seen.append(type(exception).__name__ if exception is not None else "None")

        event.listen(engine.sync_engine.pool, "invalidate", record)
        return found

    def __str__(self) -> str:
        return ", ".join(self.seen) or "none"


def error_chain(err: BaseException) -> str:
    """``DBAPIError ← asyncpg QueryCanceledError [57014]: message`` (what wraps what)."""
    orig = getattr(err, "orig", None)
    driver = orig.__cause__ if orig is not None else None
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
            pid = await backend_pid(session)
    except exc.DBAPIError as err:
        return Attempt(error_chain(err), None, err.connection_invalidated)
    except Exception as err:
        return Attempt(describe(err))
    return Attempt("ok", pid)


def watch_sleepers(lab: Lab, app: str) -> probes.Peak:
    """Counts, in the background, how many backends of ``app`` run pg_sleep at once."""
    return probes.Peak(lambda: probes.sleepers(lab.engine, app), within=BOUND, every=0.01)


@dataclass
class Ledger:
    """Usernames committed (must all be there at the end) and rolled back (must not)."""

    tag: str
    rows: int
    committed: list[str] = field(default_factory=list)
    interrupted: list[str] = field(default_factory=list)

    def names(self, label: str) -> list[str]:
        return [f"{self.tag}{label}-{i}" for i in range(self.rows)]

    async def commit(self, sessions: async_sessionmaker[AsyncSession], label: str) -> None:
        """Commit ``rows`` users in a transaction of their own (they must survive)."""
        names = self.names(label)
        async with sessions.begin() as session:
            session.add_all(User(username=name) for name in names)
        self.committed += names

    async def flush_doomed(self, session: AsyncSession, label: str) -> None:
        """Flush ``rows`` users in ``session``'s transaction, which is about to be interrupted."""
        names = self.names(label)
        self.interrupted += names
        session.add_all(User(username=name) for name in names)
        await session.flush()


def one_connection(
    lab: Lab, app: str, **overrides: Any
) -> tuple[AsyncEngine, async_sessionmaker[AsyncSession]]:
    """An engine of one pooled connection, its backend named ``app``; no pre-ping unless
    ``overrides`` (engine options) say otherwise."""
    options: dict[str, Any] = {"pool_size": 1, "max_overflow": 0, "pool_pre_ping": False}
    engine = lab.engine_with(application_name=app, **(options | overrides))
    return engine, create_session_factory(engine)


# ---------------------------------------------------------------- the experiment


@experiment(10, "Cancellation, timeouts and faults")
async def run(
    lab: Lab,
    *,
    rows: int = 3,
    cancel_after: float = 0.3,
    long_sleep: float = 10.0,
    statement_timeout_ms: int = 200,
    slow: float = 0.5,
) -> None:
    """When a query is cancelled (asyncio.timeout), times out on the server
    (statement_timeout) or loses its backend (pg_terminate_backend), is the query
    really gone, what happens to the connection, does the pool serve the next
    request — with and without pool_pre_ping — and is any committed row lost?"""
    ledger = Ledger(lab.tag, rows)
    await cancel_with_asyncio_timeout(lab, ledger, cancel_after, long_sleep)
    await cancel_in_asyncpg_alone(lab, cancel_after, long_sleep)
    await asyncpg_command_timeout(lab, ledger, cancel_after, long_sleep)
    await server_statement_timeout(lab, ledger, statement_timeout_ms, long_sleep, slow)
    await set_local_statement_timeout(lab, ledger, statement_timeout_ms, slow)
    killed = {
        pre_ping: await terminate_pooled(lab, ledger, pre_ping=pre_ping)
        for pre_ping in (False, True)
    }
    check_terminated(lab, killed)
    await killed_mid_transaction(lab, ledger)
    await count_rows(lab, ledger)


async def cancel_with_asyncio_timeout(
    lab: Lab, ledger: Ledger, cancel_after: float, long_sleep: float
) -> None:
    """``asyncio.timeout`` around a long pg_sleep inside an ORM transaction."""
    app = f"{lab.tag}cancel"
    engine, sessions = one_connection(lab, app)
    invalidations = Invalidations.on(engine)
    await ledger.commit(sessions, "before-cancel")

    async with sessions() as session:
        pid = await backend_pid(session)
        await ledger.flush_doomed(session, "cancelled")
        watcher = watch_sleepers(lab, app)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(cancel_after):
                await session.execute(select(func.pg_sleep(long_sleep)))
            raised = "no error"
        except TimeoutError as err:
            raised = describe(err).rstrip(": ")
        finally:
            seen_sleeping = await watcher.stop()
        lab.figure("asyncio.timeout: TimeoutError after", time.perf_counter() - started, "s")
        out_while_open = checked_out(engine)
        still_in_transaction = session.in_transaction()
        reuse = await outcome(session.execute(select(1)))
        await session.rollback()
        pid_after_rollback = await backend_pid(session)

    remaining, seconds = await no_sleepers(lab, app)
    lab.figure("asyncio.timeout: pg_sleep gone from pg_stat_activity after", seconds, "s")
    old_alive = await probes.live_pids(lab.engine, [pid])
    after = await one_request(sessions)

    lab.check(
        "asyncio.timeout: the caller gets TimeoutError",
        "asyncio.timeout cancels the task awaiting session.execute(pg_sleep) — while the "
        "server was running it — and turns the CancelledError into TimeoutError.",
        expected="TimeoutError; pg_sleep seen running before",
        observed=f"{raised}; pg_sleep seen running: {seen_sleeping > 0}",
        passed=raised == "TimeoutError" and seen_sleeping > 0,
    )
    lab.check(
        "asyncio.timeout: the server-side query is gone",
        f"After the TimeoutError no backend of the app is still running pg_sleep (polled "
        f"up to {BOUND:.0f} s): cancelling the Python task does stop the query on the server.",
        expected="0 backends in pg_sleep",
        observed=f"{remaining} backends in pg_sleep after {seconds:.3f} s",
        passed=remaining == 0,
    )
    lab.check(
        "asyncio.timeout: SQLAlchemy invalidates the cancelled connection",
        "SQLAlchemy treats a CancelledError/TimeoutError during execute as a disconnect: "
        "it invalidates that connection at once (pool 'invalidate' event, the backend "
        "process exits), so it is never returned to the pool half-way through a query — "
        "nothing stays checked out even while the session is still open.",
        expected="invalidated by CancelledError; backend exited; 0 checked out",
        observed=f"invalidated by: {invalidations}; backend {pid} "
        f"{'still alive' if old_alive else 'exited'}; {out_while_open} checked out",
        passed=invalidations.seen == ["CancelledError"] and not old_alive and out_while_open == 0,
    )
    lab.check(
        "asyncio.timeout: the session must be rolled back",
        "The session still has its (now invalid) transaction: the next statement on it "
        "raises PendingRollbackError; after await session.rollback() it works again, on a "
        "new connection.",
        expected="in transaction; PendingRollbackError; after rollback: new backend",
        observed=f"in transaction: {still_in_transaction}; {reuse.split(':')[0]}; after "
        f"rollback: {'new' if pid_after_rollback not in (pid, 0) else 'same'} backend",
        passed=still_in_transaction
        and reuse.startswith("PendingRollbackError")
        and pid_after_rollback not in (pid, 0),
    )
    lab.check(
        "asyncio.timeout: the pool serves the next request",
        "Without pre-ping, the next session on the same one-connection pool works at once "
        "(on a fresh backend) and nothing is left checked out.",
        expected="ok on a new backend; 0 checked out",
        observed=f"{after.result} on {'a new' if after.pid != pid else 'the same'} backend; "
        f"{checked_out(engine)} checked out",
        passed=after.result == "ok" and after.pid != pid and checked_out(engine) == 0,
    )


async def cancel_in_asyncpg_alone(lab: Lab, cancel_after: float, long_sleep: float) -> None:
    """The same cancellation on the bare asyncpg connection, below SQLAlchemy."""
    app = f"{lab.tag}raw"
    engine = lab.engine_with(application_name=app, poolclass=NullPool)
    async with engine.connect() as conn:
        raw = await conn.get_raw_connection()
        driver: Any = raw.driver_connection
        pid = int(driver.get_server_pid())
        try:
            async with asyncio.timeout(cancel_after):
                await driver.fetchval("SELECT pg_sleep($1)", long_sleep)
            raised = "no error"
        except TimeoutError as err:
            raised = describe(err).rstrip(": ")
        remaining, seconds = await no_sleepers(lab, app)
        async with asyncio.timeout(BOUND):
            pid_after = int(await driver.fetchval("SELECT pg_backend_pid()"))
        closed = bool(driver.is_closed())
    lab.figure("asyncpg alone: pg_sleep gone after", seconds, "s")
    lab.check(
        "asyncpg alone: a cancelled query is cancelled, the connection kept",
        "Below SQLAlchemy, asyncpg answers the task cancellation with a PostgreSQL "
        "CancelRequest: the query stops on the server, while the connection stays open and "
        "usable on the same backend. Closing the connection is SQLAlchemy's decision.",
        expected="TimeoutError; 0 in pg_sleep; open; same backend",
        observed=f"{raised}; {remaining} in pg_sleep; {'closed' if closed else 'open'}; "
        f"{'same' if pid_after == pid else 'another'} backend",
        passed=raised == "TimeoutError" and remaining == 0 and not closed and pid_after == pid,
    )


async def asyncpg_command_timeout(
    lab: Lab, ledger: Ledger, command_timeout: float, long_sleep: float
) -> None:
    """asyncpg's own ``command_timeout`` (a connect argument)."""
    app = f"{lab.tag}cmdtimeout"
    engine, sessions = one_connection(lab, app, driver_args={"command_timeout": command_timeout})
    invalidations = Invalidations.on(engine)
    await ledger.commit(sessions, "before-command-timeout")
    async with sessions() as session:
        pid = await backend_pid(session)
        await ledger.flush_doomed(session, "command-timed-out")
        wrapped = False
        try:
            async with asyncio.timeout(BOUND):
                await session.execute(select(func.pg_sleep(long_sleep)))
            raised = "no error"
        except Exception as err:
            raised = describe(err).rstrip(": ")
            wrapped = isinstance(err, exc.SQLAlchemyError)
        await session.rollback()
    remaining, _ = await no_sleepers(lab, app)
    old_alive = await probes.live_pids(lab.engine, [pid])
    after = await one_request(sessions)
    lab.check(
        "command_timeout: a bare TimeoutError, and the connection is invalidated",
        "asyncpg's command_timeout raises TimeoutError, which SQLAlchemy does not wrap in a "
        "DBAPIError and handles like a cancellation: the connection is invalidated (its "
        "backend exits, the query with it: issue #10717 was a query left running here), and "
        "the next request gets a new connection.",
        expected="TimeoutError (not wrapped); invalidated by TimeoutError; 0 in pg_sleep; "
        "backend exited; next: ok on a new backend",
        observed=f"{raised} ({'wrapped' if wrapped else 'not wrapped'}); invalidated by: "
        f"{invalidations}; {remaining} in pg_sleep; backend "
        f"{'still alive' if old_alive else 'exited'}; next: {after.result} on "
        f"{'a new' if after.pid != pid else 'the same'} backend",
        passed=raised == "TimeoutError"
        and not wrapped
        and invalidations.seen == ["TimeoutError"]
        and remaining == 0
        and not old_alive
        and after.result == "ok"
        and after.pid != pid,
    )


async def server_statement_timeout(
    lab: Lab, ledger: Ledger, timeout_ms: int, long_sleep: float, slow: float
) -> None:
    """``statement_timeout`` for every connection of an engine, a startup server setting."""
    app = f"{lab.tag}stmt"
    engine, sessions = one_connection(
        lab, app, server_settings={"statement_timeout": str(timeout_ms)}
    )
    invalidations = Invalidations.on(engine)
    await ledger.commit(sessions, "before-statement-timeout")

    async with sessions() as session:
        shown = await session.scalar(text("SHOW statement_timeout"))
        pid = await backend_pid(session)
        await ledger.flush_doomed(session, "statement-timed-out")
        error: exc.DBAPIError | None = None
        started = time.perf_counter()
        try:
            async with asyncio.timeout(BOUND):
                await session.execute(select(func.pg_sleep(long_sleep)))
            raised = "no error"
        except exc.DBAPIError as err:
            error = err
            raised = error_chain(err)
        except TimeoutError:
            raised = f"no server error within {BOUND:.0f} s"
        lab.figure("statement_timeout: error after", time.perf_counter() - started, "s")
        next_in_transaction = await sql_outcome(session.execute(select(1)))
        await session.rollback()
        pid_after = await backend_pid(session)
        await session.commit()
        await ledger.commit(sessions, "after-statement-timeout")

        # the connection default can be lifted for one transaction
        await session.execute(text("SET LOCAL statement_timeout = 0"))
        lifted = await outcome(session.execute(select(func.pg_sleep(slow))))
        await session.commit()
        shown_again = await session.scalar(text("SHOW statement_timeout"))
        await session.commit()

    lab.check(
        "statement_timeout (server_settings): the server cancels the statement",
        "statement_timeout given in asyncpg's server_settings is the session default of every "
        "connection of the engine; a longer statement fails with SQLSTATE 57014 "
        "'canceling statement due to statement timeout', which SQLAlchemy wraps as a plain "
        "DBAPIError around asyncpg's QueryCanceledError.",
        expected=f"SHOW: {timeout_ms}ms; DBAPIError ← asyncpg QueryCanceledError [57014]: "
        "canceling statement due to statement timeout",
        observed=f"SHOW: {shown}; {raised}",
        passed=shown == f"{timeout_ms}ms"
        and error is not None
        and sqlstate(error) == "57014"
        and "QueryCanceledError" in raised
        and "statement timeout" in raised,
    )
    lab.check(
        "statement_timeout: the connection stays usable",
        "A server-side timeout is an ordinary SQL error, not a disconnect: the connection is "
        "not invalidated, the rest of the transaction is refused (25P02 'current transaction "
        "is aborted') until rollback, after which the same backend carries on.",
        expected="not invalidated (pool events: none); next statement: DBAPIError ← asyncpg "
        "InFailedSQLTransactionError [25P02]: current transaction is aborted...; same backend "
        "after; 0 checked out",
        observed=f"{'invalidated' if error is None or error.connection_invalidated else 'not'}"
        f" invalidated (pool events: {invalidations}); next statement: "
        f"{next_in_transaction}; "
        f"{'same' if pid_after == pid else 'another'} backend after; "
        f"{checked_out(engine)} checked out",
        passed=error is not None
        and not error.connection_invalidated
        and not invalidations.seen
        and "[25P02]" in next_in_transaction
        and pid_after == pid
        and checked_out(engine) == 0,
    )
    lab.check(
        "statement_timeout: SET LOCAL lifts the default for one transaction",
        f"SET LOCAL statement_timeout = 0 lets one transaction run a {slow:g} s statement "
        f"on that engine; the next transaction has the {timeout_ms}ms default again.",
        expected=f"ok; then SHOW: {timeout_ms}ms",
        observed=f"{lifted}; then SHOW: {shown_again}",
        passed=lifted == "ok" and shown_again == f"{timeout_ms}ms",
    )


async def set_local_statement_timeout(
    lab: Lab, ledger: Ledger, timeout_ms: int, slow: float
) -> None:
    """``SET LOCAL statement_timeout`` inside one transaction of a default engine."""
    app = f"{lab.tag}local"
    _, sessions = one_connection(lab, app)
    async with sessions() as session:
        pid = await backend_pid(session)
        default = await session.scalar(text("SHOW statement_timeout"))
        await session.execute(text(f"SET LOCAL statement_timeout = '{timeout_ms}ms'"))
        inside = await session.scalar(text("SHOW statement_timeout"))
        await ledger.flush_doomed(session, "set-local-timed-out")
        try:
            async with asyncio.timeout(BOUND):
                await session.execute(select(func.pg_sleep(slow)))
            first = "no error"
        except exc.DBAPIError as err:
            first = sqlstate(err) or error_chain(err)
        except TimeoutError:
            first = f"no server error within {BOUND:.0f} s"
        await session.rollback()

        later = await session.scalar(text("SHOW statement_timeout"))
        started = time.perf_counter()
        second = await outcome(session.execute(select(func.pg_sleep(slow))))
        seconds = time.perf_counter() - started
        lab.figure(f"SET LOCAL: the next transaction's pg_sleep({slow:g})", seconds, "s")
        after_rows = ledger.names("after-set-local")
        session.add_all(User(username=name) for name in after_rows)
        await session.commit()
        ledger.committed += after_rows
        pid_after = await backend_pid(session)
        await session.commit()
    lab.check(
        "SET LOCAL statement_timeout: only that transaction",
        f"SET LOCAL statement_timeout = '{timeout_ms}ms' cancels a {slow:g} s statement in "
        "its transaction (57014); the next transaction on the same connection is back to "
        "the server's default and runs the same statement to the end.",
        expected=f"inside: {timeout_ms}ms, 57014; next transaction (same backend): "
        f"{default} (the default), ok",
        observed=f"inside: {inside}, {first}; next transaction "
        f"({'same' if pid_after == pid else 'another'} backend): {later}, {second}",
        passed=inside == f"{timeout_ms}ms"
        and first == "57014"
        and later == default
        and second == "ok"
        and pid_after == pid,
    )


@dataclass
class Killed:
    """What pg_terminate_backend on a pool's idle connections led to."""

    pooled: int
    server_pids: list[int]
    terminated: list[bool]
    survivors: list[int]
    attempts: list[Attempt]
    invalidations: Invalidations
    checked_out: int


async def terminate_pooled(lab: Lab, ledger: Ledger, *, pre_ping: bool) -> Killed:
    """Kill every idle pooled connection of an engine, then use the engine again."""
    variant = "ping" if pre_ping else "noping"
    app = f"{lab.tag}kill-{variant}"
    engine = lab.engine_with(
        application_name=app,
        pool_size=2,
        max_overflow=0,
        pool_timeout=BOUND,
        pool_pre_ping=pre_ping,
    )
    sessions = create_session_factory(engine)
    invalidations = Invalidations.on(engine)
    await ledger.commit(sessions, f"before-kill-{variant}")
    async with sessions() as first, sessions() as second:  # both connections at once
        await backend_pid(first)
        await backend_pid(second)
    pooled = queue_pool(engine).checkedin()
    server_pids = await probes.backend_pids(lab.engine, app)
    terminated = [await probes.terminate(lab.engine, pid, wait=BOUND) for pid in server_pids]
    survivors = await probes.live_pids(lab.engine, server_pids)
    attempts = [await one_request(sessions) for _ in range(3)]
    await ledger.commit(sessions, f"after-kill-{variant}")
    return Killed(
        pooled, server_pids, terminated, survivors, attempts, invalidations, checked_out(engine)
    )


def check_terminated(lab: Lab, killed: dict[bool, Killed]) -> None:
    lab.check(
        "pg_terminate_backend: both pooled connections killed",
        "Each engine's pool held its 2 idle connections; pg_terminate_backend(pid, timeout) "
        "killed both backends and they are gone from pg_stat_activity.",
        expected="pre-ping off: 2 pooled, 2 killed, 0 left; pre-ping on: the same",
        observed="; ".join(
            f"pre-ping {'on' if flag else 'off'}: {k.pooled} pooled, {sum(k.terminated)} "
            f"killed, {len(k.survivors)} left"
            for flag, k in killed.items()
        ),
        passed=all(
            k.pooled == 2 and len(k.server_pids) == 2 and all(k.terminated) and not k.survivors
            for k in killed.values()
        ),
    )
    off = killed[False]
    first = off.attempts[0]
    later_pids = {a.pid for a in off.attempts[1:]}
    lab.check(
        "without pool_pre_ping: the next checkout fails, then the pool recovers",
        "The pool hands out a dead connection: the first request fails with a disconnect "
        "error (connection_invalidated=True). That one error invalidates the connection and "
        "every pooled one older than it (one pool invalidate event for both), so the "
        "following requests work on new backends.",
        expected="1st: InterfaceError, invalidated; then: ok, ok on new backends (pool "
        "invalidate events: InterfaceError)",
        observed=f"1st: {first.result}, {'invalidated' if first.invalidated else 'not invalidated'}"
        f"; then: {', '.join(a.result for a in off.attempts[1:])} on "
        f"{'new' if not later_pids & set(off.server_pids) else 'killed'} backends "
        f"(pool invalidate events: {off.invalidations})",
        passed=first.result.startswith("InterfaceError")
        and first.invalidated is True
        and all(a.result == "ok" for a in off.attempts[1:])
        and not later_pids & set(off.server_pids)
        and off.invalidations.seen == ["InterfaceError"]
        and off.checked_out == 0,
    )
    on = killed[True]
    pids_on = {a.pid for a in on.attempts}
    lab.check(
        "with pool_pre_ping: the pool recovers without an error",
        "With pre-ping each checkout first pings the connection (pessimistic disconnect "
        "handling): the failed ping raises InvalidatePoolError inside the pool, which "
        "replaces that connection and invalidates every pooled one older than it, so no "
        "request sees an error and every one runs on a new backend.",
        expected="ok, ok, ok on new backends (pool invalidate events: InvalidatePoolError)",
        observed=f"{', '.join(a.result for a in on.attempts)} on "
        f"{'new' if not pids_on & set(on.server_pids) else 'killed'} backends "
        f"(pool invalidate events: {on.invalidations})",
        passed=all(a.result == "ok" for a in on.attempts)
        and not pids_on & set(on.server_pids)
        and on.invalidations.seen == ["InvalidatePoolError"]
        and on.checked_out == 0,
    )


async def killed_mid_transaction(lab: Lab, ledger: Ledger) -> None:
    """The backend of a checked-out connection is killed between flush and commit."""
    app = f"{lab.tag}kill-midway"
    # pre-ping on, explicitly (not DB_PRE_PING's default): the claim is that it cannot help
    engine, sessions = one_connection(lab, app, pool_pre_ping=True)
    async with sessions() as session:
        pid = await backend_pid(session)
        await ledger.flush_doomed(session, "killed-mid-way")
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
    lab.check(
        "killed mid-transaction: pre-ping cannot help, the commit fails",
        "Pre-ping (on here) only tests a connection at checkout: when the backend of a "
        "checked-out connection is killed between flush and commit, the commit fails with a "
        "disconnect error; the pool then serves the next request.",
        expected="killed; commit: InterfaceError, invalidated; next: ok",
        observed=f"{'killed' if killed else 'not killed'}; commit: {commit}, "
        f"{'invalidated' if invalidated else 'not invalidated'}; next: {after.result}; "
        f"{checked_out(engine)} checked out",
        passed=killed
        and commit.startswith("InterfaceError")
        and invalidated is True
        and after.result == "ok"
        and checked_out(engine) == 0,
    )


async def count_rows(lab: Lab, ledger: Ledger) -> None:
    async with lab.sessions() as session:
        present = set(
            await session.scalars(select(User.username).where(User.username.startswith(lab.tag)))
        )
    kept = [name for name in ledger.committed if name in present]
    leaked = [name for name in ledger.interrupted if name in present]
    lab.check(
        "no committed row is lost",
        "Every row committed before, between and after the faults is in the table, each "
        "exactly once.",
        expected=f"{len(ledger.committed)} of {len(ledger.committed)}",
        observed=f"{len(kept)} of {len(ledger.committed)}",
        passed=len(kept) == len(ledger.committed) == len(set(ledger.committed)),
    )
    lab.check(
        "interrupted transactions leave nothing behind",
        "Rows flushed in a transaction that was cancelled, timed out or lost its backend are "
        "not in the table: each interrupted transaction was rolled back as a whole.",
        expected=f"0 of {len(ledger.interrupted)}",
        observed=f"{len(leaked)} of {len(ledger.interrupted)}",
        passed=not leaked and len(present) == len(ledger.committed),
    )
