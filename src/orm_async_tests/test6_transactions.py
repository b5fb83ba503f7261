"""What do sessions.begin() and begin_nested() commit or roll back, which anomalies does
each PostgreSQL isolation level allow or stop (and with which error), how does a retry
loop recover from a serialization failure, and how do you run a statement that cannot
run inside a transaction?

``async with sessions.begin()`` commits or rolls back the whole block;
``session.begin_nested()`` is a SAVEPOINT, so one failing statement can be
undone without losing the rest of the transaction. The isolation level is chosen
per transaction with ``session.connection(execution_options={"isolation_level":
...})`` (or an engine copy from ``engine.execution_options(isolation_level=...)``);
with asyncpg the level goes into asyncpg's own ``BEGIN ISOLATION LEVEL ...``, so no
``SET TRANSACTION`` statement shows up among the statements SQLAlchemy sends. The
experiment drives two transactions step by step from one coroutine (two sessions,
explicit awaits in a fixed order, no sleeps), so every interleaving below happens
the same way on every run, and each transaction bounds its lock waits with
``SET LOCAL lock_timeout``.

Observed here: the non-repeatable read and the lost update under READ COMMITTED
(prevented under REPEATABLE READ, the latter with a serialization failure);
write skew (two on-call users, each transaction suspends one after checking that
both are active) committing under READ COMMITTED and REPEATABLE READ and stopped
under SERIALIZABLE with SQLSTATE 40001; a retry loop that catches
``sqlalchemy.exc.DBAPIError`` whose ``.orig.sqlstate == "40001"`` and re-runs the
whole transaction; ``CREATE INDEX CONCURRENTLY`` refused inside a transaction and
accepted on an ``AUTOCOMMIT`` connection.

Sources: SQLAlchemy docs, "Setting Transaction Isolation Levels including DBAPI
Autocommit" (``Connection.execution_options(isolation_level=...)``, the level is
reset when the connection returns to the pool; "Understanding the DBAPI-Level
Autocommit Isolation Level"), ORM "Transactions and Connection Management" —
"Using SAVEPOINT" (``begin_nested()``; objects added inside a rolled-back
savepoint are expunged) and "Setting Isolation for Individual Transactions"
(``Session.connection(execution_options=...)`` must come before the transaction
uses the connection); "Asynchronous I/O (asyncio)" (``AsyncSession.connection``,
``AsyncConnection.execution_options``). PostgreSQL docs 13.2 "Transaction
Isolation" (Read Committed sees each statement's snapshot; Repeatable Read raises
"could not serialize access due to concurrent update"; Serializable detects
read/write dependencies), 13.5 "Serialization Failure Handling" (SQLSTATE 40001:
retry the whole transaction), and "CREATE INDEX" — "Building Indexes Concurrently"
(cannot run inside a transaction block). Issue threads: sqlalchemy/sqlalchemy#11729
(maintainers point at the per-sessionmaker / engine-wide isolation settings);
CentOS/duffy#922 (the asyncpg serialization failure arrives as a plain
``DBAPIError`` wrapping ``asyncpg.exceptions.SerializationError``);
lablup/backend.ai#2355 (the 40001 can surface at COMMIT, so the retry must wrap
the whole ``begin ... commit``); conbench/conbench#788 and langchain-ai/langgraph#2887
(``CREATE INDEX CONCURRENTLY cannot run inside a transaction block``; the fix is
autocommit).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from sqlalchemy import func, inspect, select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from .lab import (
    BadSizes,
    Lab,
    at_least,
    capture,
    contains,
    describe,
    driver_error,
    experiment,
    first_line,
    matches,
    on,
    outcome,
    prefix,
    sqlstate,
)
from .models import User, UserStatus

SERIALIZATION_FAILURE = "40001"
READ_COMMITTED, REPEATABLE_READ, SERIALIZABLE = "READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"
LEVELS = (READ_COMMITTED, REPEATABLE_READ, SERIALIZABLE)
BOUND = 30.0  # seconds: the outer guard around every interleaving; lock_timeout trips first

T = TypeVar("T")


@dataclass(frozen=True)
class Sizes:
    lock_timeout_ms: int = 2000
    """lock_timeout of every interleaved transaction (SET LOCAL), in ms."""
    statement_timeout_ms: int = 15000
    """statement_timeout (and lock_timeout) of the CREATE INDEX CONCURRENTLY steps, in ms."""
    max_attempts: int = 5
    """Attempts the serialization-failure retry loop makes at most."""

    def __post_init__(self) -> None:
        if self.max_attempts < 2:
            raise BadSizes(
                f"max_attempts ({self.max_attempts}) must be at least 2: the first attempt "
                "fails on purpose"
            )
        for name in ("lock_timeout_ms", "statement_timeout_ms"):
            if getattr(self, name) < 1:
                raise BadSizes(f"{name} must be at least 1 (0 turns the bound off)")


run = experiment(6, "Transactions, savepoints and isolation levels", Sizes)


class Abort(Exception):
    """Raised on purpose inside ``sessions.begin()`` to see the block roll back."""


def server_error(exc: BaseException | None) -> str:
    """The server's message, DETAIL and HINT, as PostgreSQL sent them (from asyncpg's error)."""
    if exc is None:
        return "no error"
    driver = driver_error(exc)  # the asyncpg exception behind the dialect's wrapper
    text_ = first_line(driver)
    for part in ("detail", "hint"):
        value = getattr(driver, part, None)
        if value:
            text_ += f" {part.upper()}: {value}"
    return text_


def is_serialization_failure(exc: BaseException) -> bool:
    return isinstance(exc, DBAPIError) and sqlstate(exc) == SERIALIZATION_FAILURE


def state(obj: object) -> str:
    """The ORM state of an object: transient, pending, persistent, deleted or detached."""
    found = inspect(obj)
    for name in ("transient", "pending", "persistent", "deleted", "detached"):
        if getattr(found, name):
            return name
    return "unknown"


async def begin_at(session: AsyncSession, level: str, lock_timeout_ms: int) -> str:
    """Start the session's transaction at ``level``; bound its lock waits; return what the
    server says the level is (``SHOW transaction_isolation``)."""
    await session.connection(execution_options={"isolation_level": level})
    await session.execute(text(f"SET LOCAL lock_timeout = '{int(lock_timeout_ms)}ms'"))
    return str(await session.scalar(text("SHOW transaction_isolation")))


async def count_users(sessions: async_sessionmaker[AsyncSession], *names: str) -> int:
    async with sessions() as session:
        found = await session.scalar(
            select(func.count()).select_from(User).where(User.username.in_(names))
        )
    return int(found or 0)


async def count_active(session: AsyncSession, names: tuple[str, str]) -> int:
    found = await session.scalar(
        select(func.count())
        .select_from(User)
        .where(User.username.in_(names), User.status == UserStatus.active)
    )
    return int(found or 0)


async def suspend(session: AsyncSession, name: str) -> None:
    await session.execute(
        update(User).where(User.username == name).values(status=UserStatus.suspended)
    )


async def make_active(sessions: async_sessionmaker[AsyncSession], names: tuple[str, str]) -> None:
    async with sessions.begin() as session:
        await session.execute(
            update(User).where(User.username.in_(names)).values(status=UserStatus.active)
        )


async def committed_users(lab: Lab[Sizes], *names: str) -> None:
    async with lab.sessions.begin() as session:
        session.add_all(User(username=name) for name in names)


@asynccontextmanager
async def on_call(lab: Lab[Sizes]) -> AsyncIterator[tuple[str, str]]:
    """Two on-call users (of whom at least one must stay active), committed once."""
    pair = (lab.name("oncall-a"), lab.name("oncall-b"))
    await committed_users(lab, *pair)
    yield pair


# ---------------------------------------------------------------------------------------------
# sessions.begin() and begin_nested()


@run.scenario
async def begin_commits_or_rolls_back(lab: Lab[Sizes]) -> None:
    """One ``async with sessions.begin()`` block that ends normally, one that flushes an
    INSERT and then raises."""
    committed, rolled_back = lab.name("begin-ok"), lab.name("begin-aborted")
    async with lab.sessions.begin() as session:
        session.add(User(username=committed))  # no commit() call: the block commits
    raised = "nothing raised"
    flushed = -1
    try:
        async with lab.sessions.begin() as session:
            session.add(User(username=rolled_back))
            await session.flush()  # the INSERT reached the server...
            flushed = int(
                await session.scalar(
                    select(func.count()).select_from(User).where(User.username == rolled_back)
                )
                or 0
            )
            raise Abort("give up")  # ...and the block's exit rolls it back
    except Abort as exc:
        raised = describe(exc)
    lab.check(
        "sessions.begin(): commit on success, rollback on exception",
        "`async with sessions.begin()` commits when the block ends normally (no commit() "
        "call needed) and rolls back when it raises, even after a flush sent the INSERT; "
        "the exception still propagates.",
        expected={
            "ok block: rows": 1,
            "raising block: rows it sees after its flush": 1,
            "raising block: raised": prefix("Abort"),
            "raising block: rows": 0,
        },
        observed={
            "ok block: rows": await count_users(lab.sessions, committed),
            "raising block: rows it sees after its flush": flushed,
            "raising block: raised": raised,
            "raising block: rows": await count_users(lab.sessions, rolled_back),
        },
    )


@run.scenario
async def a_savepoint_undoes_one_failure(lab: Lab[Sizes]) -> None:
    """In one transaction: flush user A, try a duplicate username inside begin_nested(),
    then add user B and commit; the statements sent and the objects' states recorded."""
    taken, first, second = lab.name("taken"), lab.name("nested-a"), lab.name("nested-b")
    await committed_users(lab, taken)

    error: IntegrityError | None = None
    with lab.statements() as sent:
        async with lab.sessions.begin() as session:
            user_a = User(username=first)
            session.add(user_a)
            await session.flush()
            duplicate = User(username=taken)
            try:
                async with session.begin_nested():  # SAVEPOINT
                    session.add(duplicate)
                    await session.flush()  # unique violation
            except IntegrityError as exc:
                error = exc  # the savepoint is rolled back, the outer transaction lives on
            states = {"duplicate": state(duplicate), "A": state(user_a)}
            session.add(User(username=second))
    savepoint_sql = [s for s in sent if "SAVEPOINT" in s.upper()]
    lab.check(
        "begin_nested(): an inner failure is undone, the outer work commits",
        "Inside begin_nested() (a SAVEPOINT) a duplicate username raises IntegrityError; "
        "leaving the block rolls back to the savepoint only, so user A (flushed before) and "
        "user B (added after) commit, and the duplicate is not there.",
        expected={
            "error": prefix("IntegrityError"),
            "sqlstate": "23505",
            "user A": 1,
            "user B": 1,
            "the taken name": 1,
        },
        observed={
            "error": describe(error) if error else "no error",
            "sqlstate": sqlstate(error) if error else None,
            "user A": await count_users(lab.sessions, first),
            "user B": await count_users(lab.sessions, second),
            "the taken name": await count_users(lab.sessions, taken),
        },
    )
    lab.check(
        "begin_nested() sends SAVEPOINT and ROLLBACK TO SAVEPOINT",
        "The nested transaction is plain SQL on the same connection: SAVEPOINT when it "
        "begins, ROLLBACK TO SAVEPOINT when the block raises (no RELEASE).",
        expected={
            "statements": [matches(r"^SAVEPOINT \w+$"), matches(r"^ROLLBACK TO SAVEPOINT \w+$")],
            "savepoint names": 1,
        },
        observed={
            "statements": savepoint_sql,
            "savepoint names": len({s.split()[-1] for s in savepoint_sql}),
        },
    )
    lab.check(
        "objects added inside the rolled-back savepoint are expunged",
        "After ROLLBACK TO SAVEPOINT the session forgets the objects added inside it (the "
        "duplicate is transient again), while objects flushed before the savepoint stay "
        "persistent.",
        expected={"duplicate": "transient", "A": "persistent"},
        observed=states,
    )


@run.scenario
async def without_a_savepoint(lab: Lab[Sizes]) -> None:
    """The same duplicate username without begin_nested(): flush user A, flush the
    duplicate, run one more statement, roll back."""
    taken, plain = lab.name("taken-plain"), lab.name("plain-a")
    await committed_users(lab, taken)
    async with lab.sessions() as session:
        session.add(User(username=plain))
        await session.flush()
        session.add(User(username=taken))
        flush_error = await outcome(session.flush())
        next_statement = await outcome(session.execute(select(1)))
        await session.rollback()
    lab.check(
        "without a savepoint the failure loses the earlier work",
        "The same duplicate without begin_nested(): the session refuses every further "
        "statement (PendingRollbackError) until rollback(), and user A, flushed before the "
        "failure, is gone.",
        expected={
            "the flush": prefix("IntegrityError"),
            "the next statement": prefix("PendingRollbackError"),
            "user A": 0,
        },
        observed={
            "the flush": flush_error,
            "the next statement": next_statement,
            "user A": await count_users(lab.sessions, plain),
        },
    )


# ---------------------------------------------------------------------------------------------
# choosing and verifying the level


@run.scenario
async def choosing_the_level(lab: Lab[Sizes]) -> None:
    """On a one-connection engine: a session per level asks for it with
    session.connection(execution_options=...), one session is bound to
    engine.execution_options(isolation_level=SERIALIZABLE), the next session reads the
    level it gets; then one asks after its first statement."""
    engine = lab.one_connection()  # every session below gets the same server connection
    sessions = lab.sessions_on(engine)
    pid = "SELECT pg_backend_pid()"
    shown: dict[str, str] = {}
    pids: set[int] = set()
    statements_sent: list[str] = []
    for level in LEVELS:
        async with sessions() as session:
            with lab.statements(engine) as sent:
                await session.connection(execution_options={"isolation_level": level})
                shown[level] = str(await session.scalar(text("SHOW transaction_isolation")))
            statements_sent += sent
            pids.add(int(await session.scalar(text(pid)) or 0))
    engine_wide = lab.sessions_on(engine.execution_options(isolation_level=SERIALIZABLE))
    async with engine_wide() as session:
        shown["engine.execution_options(SERIALIZABLE)"] = str(
            await session.scalar(text("SHOW transaction_isolation"))
        )
        pids.add(int(await session.scalar(text(pid)) or 0))
    async with sessions() as session:
        after = str(await session.scalar(text("SHOW transaction_isolation")))
        default = str(await session.scalar(text("SHOW default_transaction_isolation")))
        pids.add(int(await session.scalar(text(pid)) or 0))
    lab.check(
        "the server runs each transaction at the level asked for",
        "session.connection(execution_options={'isolation_level': L}) before the first "
        "statement, or a session bound to engine.execution_options(isolation_level=L), "
        "makes the server report L in SHOW transaction_isolation.",
        expected={
            **{level: level.lower() for level in LEVELS},
            "engine.execution_options(SERIALIZABLE)": "serializable",
        },
        observed=shown,
    )
    lab.check(
        "the level does not leak through the pool",
        "When the session closes, SQLAlchemy restores the connection's default level: the "
        "next session on the same pooled connection (same backend pid) is back to the "
        "server default.",
        expected={"backends": 1, "next session": default},
        observed={"backends": len(pids), "next session": after},
    )
    lab.check(
        "no SET TRANSACTION is sent: asyncpg begins with the level itself",
        "With asyncpg, the level is not a SQL statement SQLAlchemy executes: the cursor "
        "events (and so echo) show no SET TRANSACTION ISOLATION LEVEL, only the SHOW, yet "
        "the server reports the level. Per the dialect source, asyncpg's transaction() sends "
        "BEGIN ISOLATION LEVEL ... itself.",
        expected=["SHOW transaction_isolation"] * len(LEVELS),
        observed=statements_sent,
    )

    # too late: the transaction has already begun
    async with sessions() as session:
        await session.execute(select(1))
        with capture.captured(collect=False) as got:
            await session.connection(execution_options={"isolation_level": SERIALIZABLE})
        late = str(await session.scalar(text("SHOW transaction_isolation")))
    lab.check(
        "asking for a level after the first statement is ignored (a warning)",
        "Once the session's transaction has used the connection, "
        "session.connection(execution_options=...) cannot change the level: SQLAlchemy "
        "only warns and the transaction stays at the default level.",
        expected={"warnings": [contains("execution_options ignored")], "level": default},
        observed={"warnings": [str(w.message) for w in got.caught], "level": late},
    )


# ---------------------------------------------------------------------------------------------
# anomalies, interleaved step by step


@dataclass
class Reread:
    level: str
    first: int
    second: int
    write: str
    write_sqlstate: str | None
    final: int


async def non_repeatable_read(lab: Lab[Sizes], level: str, name: str) -> Reread:
    """T1 reads login_count; T2 increments it and commits; T1 reads again, then writes
    ``first + 1`` (an increment computed from its first read)."""
    read = select(User.login_count).where(User.username == name)
    failed: str | None = None
    async with asyncio.timeout(BOUND), lab.sessions() as t1:
        shown = await begin_at(t1, level, lab.sizes.lock_timeout_ms)
        first = int(await t1.scalar(read) or 0)  # T1: first read (snapshot for RR)
        async with lab.sessions.begin() as t2:  # T2: increment and commit
            await t2.execute(
                update(User).where(User.username == name).values(login_count=User.login_count + 1)
            )
        second = int(await t1.scalar(read) or 0)  # T1: read again
        try:  # T1: write what it computed from its first read
            await t1.execute(
                update(User).where(User.username == name).values(login_count=first + 1)
            )
            await t1.commit()
            write = "committed"
        except DBAPIError as exc:
            write, failed = describe(exc), sqlstate(exc)
            lab.note(f"{level}, the write after a concurrent update: {server_error(exc)}")
            await t1.rollback()
    async with lab.sessions() as session:
        final = int(await session.scalar(read) or 0)
    return Reread(shown, first, second, write, failed, final)


@run.scenario
async def non_repeatable_read_and_lost_update(lab: Lab[Sizes]) -> None:
    """Per level (READ COMMITTED, REPEATABLE READ), on a counter of its own starting at 0:
    T1 reads login_count, T2 increments it and commits, T1 reads again and writes its
    first read + 1."""
    counters = {level: lab.name(f"counter-{i}") for i, level in enumerate(LEVELS[:2])}
    await committed_users(lab, *counters.values())
    rc = await non_repeatable_read(lab, READ_COMMITTED, counters[READ_COMMITTED])
    rr = await non_repeatable_read(lab, REPEATABLE_READ, counters[REPEATABLE_READ])
    lab.check(
        "non-repeatable read: READ COMMITTED vs REPEATABLE READ",
        "T1 reads login_count, T2 increments it and commits, T1 reads again: under READ "
        "COMMITTED each statement takes a new snapshot, so the second read sees T2's "
        "commit; under REPEATABLE READ both reads use the transaction's first snapshot.",
        expected={
            "read committed: level": "read committed",
            "read committed: T1's two reads": [0, 1],
            "repeatable read: level": "repeatable read",
            "repeatable read: T1's two reads": [0, 0],
        },
        observed={
            "read committed: level": rc.level,
            "read committed: T1's two reads": [rc.first, rc.second],
            "repeatable read: level": rr.level,
            "repeatable read: T1's two reads": [rr.first, rr.second],
        },
    )
    lab.check(
        "lost update: allowed by READ COMMITTED, refused by REPEATABLE READ",
        "T1 then writes login_count = (its first read) + 1. READ COMMITTED lets the write "
        "overwrite T2's increment (two increments, the counter moved by one); REPEATABLE "
        "READ refuses to update a row changed since its snapshot: SQLSTATE 40001 'could "
        "not serialize access due to concurrent update', and only T2's increment stays.",
        expected={
            "read committed: T1's write": "committed",
            "read committed: counter after 2 increments": 1,
            "repeatable read: T1's write": contains(
                "could not serialize access due to concurrent update"
            ),
            "repeatable read: sqlstate": SERIALIZATION_FAILURE,
            "repeatable read: counter after": 1,
        },
        observed={
            "read committed: T1's write": rc.write,
            "read committed: counter after 2 increments": rc.final,
            "repeatable read: T1's write": rr.write,
            "repeatable read: sqlstate": rr.write_sqlstate,
            "repeatable read: counter after": rr.final,
        },
    )


@dataclass
class Skew:
    shown: list[str] = field(default_factory=list)
    seen: list[int] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)
    failure: DBAPIError | None = None
    failed_at: str = "nowhere"
    committed: int = 0
    active_after: int = -1


async def write_skew(lab: Lab[Sizes], level: str, pair: tuple[str, str]) -> Skew:
    """Two on-call users must keep at least one active. T1 and T2 both check that both are
    active, then T1 suspends the first and T2 the second; then both commit."""
    await make_active(lab.sessions, pair)
    skew = Skew()
    async with asyncio.timeout(BOUND), lab.sessions() as t1, lab.sessions() as t2:
        tx = {"T1": t1, "T2": t2}
        for session in tx.values():
            skew.shown.append(await begin_at(session, level, lab.sizes.lock_timeout_ms))
        for session in tx.values():  # both read before either writes
            skew.seen.append(await count_active(session, pair))
        plan: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("T1 suspends A", lambda: suspend(t1, pair[0])),
            ("T2 suspends B", lambda: suspend(t2, pair[1])),
            ("T1 commits", t1.commit),
            ("T2 commits", t2.commit),
        ]
        failed: set[str] = set()
        for label, step in plan:
            who = label[:2]
            if who in failed:
                continue
            if "suspends" in label and skew.seen[int(who[1]) - 1] < 2:
                skew.steps.append(f"{who} sees fewer than 2 active, leaves it")
                continue
            try:
                await step()
            except DBAPIError as exc:
                if skew.failure is None:
                    skew.failure, skew.failed_at = exc, label
                skew.steps.append(f"{label}: {type(exc).__name__} sqlstate {sqlstate(exc)}")
                failed.add(who)
                await tx[who].rollback()
                continue
            skew.steps.append(f"{label}: ok")
            skew.committed += "commits" in label
    async with lab.sessions() as session:
        skew.active_after = await count_active(session, pair)
    return skew


@run.scenario
async def write_skew_per_level(lab: Lab[Sizes]) -> None:
    """At each level: make both on-call users active; T1 and T2 each count the active
    ones, then T1 suspends A, T2 suspends B, T1 commits, T2 commits."""
    pair = await lab.use(on_call)
    skews = {level: await write_skew(lab, level, pair) for level in LEVELS}
    for level in (READ_COMMITTED, REPEATABLE_READ):
        skew = skews[level]
        lab.check(
            f"write skew commits under {level}",
            f"Under {level} both transactions see 2 active users, each suspends a different "
            "one, both commit without any error: 0 active remain, an outcome no serial order "
            "of the two could produce.",
            expected={
                "levels": [level.lower()] * 2,
                "active seen by T1, T2": [2, 2],
                "commits": 2,
                "errors": [],
                "active after": 0,
            },
            observed={
                "levels": skew.shown,
                "active seen by T1, T2": skew.seen,
                "commits": skew.committed,
                "errors": [describe(skew.failure)] if skew.failure else [],
                "active after": skew.active_after,
            },
        )
    ser = skews[SERIALIZABLE]
    lab.check(
        "SERIALIZABLE stops write skew with a serialization failure",
        "Under SERIALIZABLE the same interleaving ends with one transaction failing with "
        "SQLSTATE 40001 (read/write dependencies among transactions) and the other "
        "committing: 1 active user remains. Both UPDATEs succeed; the failure surfaces at "
        "the second COMMIT, so a retry must wrap the commit too. The class differs by "
        "driver: on asyncpg SQLAlchemy raises a plain DBAPIError (no subclass), on psycopg "
        "an OperationalError (psycopg maps SQLSTATE class 40 to it); on both the SQLSTATE "
        "is in .orig.sqlstate, so a retry should test that, not the class.",
        expected={
            "levels": ["serializable"] * 2,
            "error type": on(asyncpg="DBAPIError", psycopg="OperationalError"),
            "sqlstate": SERIALIZATION_FAILURE,
            "message": contains("could not serialize access due to read/write dependencies"),
            "fails at": "T2 commits",
            "commits": 1,
            "active after": 1,
        },
        observed={
            "levels": ser.shown,
            "error type": type(ser.failure).__name__ if ser.failure else "no error",
            "sqlstate": sqlstate(ser.failure) if ser.failure else None,
            "message": first_line(ser.failure.orig or ser.failure) if ser.failure else "",
            "fails at": ser.failed_at,
            "commits": ser.committed,
            "active after": ser.active_after,
        },
    )
    lab.note(f"SERIALIZABLE write skew, the steps: {'; '.join(ser.steps)}")
    lab.note(f"SERIALIZABLE write skew, the server's error: {server_error(ser.failure)}")


# ---------------------------------------------------------------------------------------------
# retrying serialization failures


@dataclass
class Retried(Generic[T]):
    value: T
    attempts: int
    failures: list[str]


async def run_serializable(
    sessions: async_sessionmaker[AsyncSession],
    work: Callable[[AsyncSession, int], Awaitable[T]],
    *,
    max_attempts: int,
    lock_timeout_ms: int,
) -> Retried[T]:
    """Run ``work(session, attempt)`` in a SERIALIZABLE transaction and commit; on SQLSTATE
    40001 (at any statement or at COMMIT) throw the whole transaction away and run it again."""
    failures: list[str] = []
    for attempt in range(1, max_attempts + 1):
        async with sessions() as session:
            stage = "BEGIN"
            try:
                await begin_at(session, SERIALIZABLE, lock_timeout_ms)
                stage = "the work"
                value = await work(session, attempt)
                stage = "COMMIT"
                await session.commit()
            except DBAPIError as exc:
                if not is_serialization_failure(exc) or attempt == max_attempts:
                    raise
                failures.append(
                    f"attempt {attempt} failed in {stage}: sqlstate {sqlstate(exc)} "
                    f"'{server_error(exc)}'"
                )
                continue  # leaving the session block rolls back
        return Retried(value, attempt, failures)
    raise AssertionError("max_attempts must be at least 1")


@run.scenario
async def retrying_serialization_failures(lab: Lab[Sizes]) -> None:
    """T1, in a retry loop (SERIALIZABLE), suspends itself if both on-call users are
    active; in its first attempt only, a competitor T2 suspends the other one and commits
    between T1's read and T1's write."""
    pair = await lab.use(on_call)
    await make_active(lab.sessions, pair)
    me, other = pair
    seen: list[int] = []
    lock_timeout_ms = lab.sizes.lock_timeout_ms

    async def competitor() -> None:
        """T2, a whole SERIALIZABLE transaction that runs between T1's read and T1's write."""
        async with lab.sessions() as t2:
            await begin_at(t2, SERIALIZABLE, lock_timeout_ms)
            if await count_active(t2, pair) >= 2:
                await suspend(t2, other)
            await t2.commit()

    async def suspend_me_unless_last(session: AsyncSession, attempt: int) -> bool:
        active = await count_active(session, pair)
        seen.append(active)
        if attempt == 1:
            await competitor()  # deterministic interference, first attempt only
        if active < 2:
            return False  # the other one is already off: stay on call
        await suspend(session, me)
        return True

    async with asyncio.timeout(BOUND):
        with lab.timed("retry loop, all attempts"):
            result = await run_serializable(
                lab.sessions,
                suspend_me_unless_last,
                max_attempts=lab.sizes.max_attempts,
                lock_timeout_ms=lock_timeout_ms,
            )
    async with lab.sessions() as session:
        active_after = await count_active(session, pair)
    lab.figure("serializable transaction attempts", result.attempts, "attempts")
    lab.check(
        "a retry loop turns the serialization failure into a correct result",
        "Catching DBAPIError with .orig.sqlstate == '40001' and re-running the whole "
        "transaction: the first attempt loses to the competitor that committed in between, "
        "a later attempt sees only 1 active user, does not suspend, commits; 1 stays active.",
        expected={
            "attempts": at_least(2),
            "the first failure": contains(f"sqlstate {SERIALIZATION_FAILURE}"),
            "active seen by the last attempt": 1,
            "the last attempt suspended T1": False,
            "active after": 1,
        },
        observed={
            "attempts": result.attempts,
            "the first failure": result.failures[0] if result.failures else "none",
            "active seen by the last attempt": seen[-1] if seen else -1,
            "the last attempt suspended T1": result.value,
            "active after": active_after,
        },
    )


# ---------------------------------------------------------------------------------------------
# AUTOCOMMIT


@run.scenario
async def autocommit_for_create_index_concurrently(lab: Lab[Sizes]) -> None:
    """On a one-connection engine: CREATE INDEX CONCURRENTLY inside engine.begin(), then on
    an AUTOCOMMIT connection (two transaction ids read there, and two inside a
    transaction), then DROP INDEX CONCURRENTLY."""
    timeout_ms = int(lab.sizes.statement_timeout_ms)
    index = f"ix_{lab.tag.replace('-', '_')}users_login_count"
    create = text(f"CREATE INDEX CONCURRENTLY {index} ON users (login_count)")
    drop = text(f"DROP INDEX CONCURRENTLY IF EXISTS {index}")
    valid = text(
        "SELECT count(*) FROM pg_indexes i JOIN pg_class c ON c.relname = i.indexname "
        "JOIN pg_index x ON x.indexrelid = c.oid WHERE i.indexname = :name AND x.indisvalid"
    )
    listed = text("SELECT count(*) FROM pg_indexes WHERE indexname = :name")
    timeouts = [
        text(f"SET {name} = {timeout_ms}") for name in ("statement_timeout", "lock_timeout")
    ]
    # its own engine: the session-level SETs below stay on its connection, disposed after the run
    engine = lab.one_connection()

    in_transaction = created = "not run"
    refused_sqlstate: str | None = None
    xids: list[str] = []
    level = "?"
    found = left = -1
    try:
        try:
            async with engine.begin() as conn:
                await conn.execute(text(f"SET LOCAL statement_timeout = {timeout_ms}"))
                await conn.execute(create)
            in_transaction = "ok"
        except DBAPIError as exc:
            in_transaction, refused_sqlstate = describe(exc), sqlstate(exc)
        async with engine.connect() as conn:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            for statement in timeouts:
                await conn.execute(statement)
            xids = [str(await conn.scalar(text("SELECT pg_current_xact_id()"))) for _ in range(2)]
            level = str(await conn.scalar(text("SHOW transaction_isolation")))
            with lab.timed("CREATE INDEX CONCURRENTLY (AUTOCOMMIT)"):
                created = await outcome(conn.execute(create))
            found = int(await conn.scalar(valid, {"name": index}) or 0)
    finally:
        async with engine.connect() as conn:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            for statement in timeouts:
                await conn.execute(statement)
            await conn.execute(drop)
            left = int(await conn.scalar(listed, {"name": index}) or 0)
    async with engine.begin() as conn:
        same_xid = [str(await conn.scalar(text("SELECT pg_current_xact_id()"))) for _ in range(2)]

    lab.check(
        "CREATE INDEX CONCURRENTLY is refused inside a transaction",
        "In a transaction (engine.begin(), as every Session is) PostgreSQL refuses the "
        "statement before doing any work: SQLSTATE 25001.",
        expected={
            "error": contains("CREATE INDEX CONCURRENTLY cannot run inside a transaction block"),
            "sqlstate": "25001",
        },
        observed={"error": in_transaction, "sqlstate": refused_sqlstate},
    )
    lab.check(
        "AUTOCOMMIT: each statement is its own transaction",
        "isolation_level='AUTOCOMMIT' puts the driver connection in autocommit: no BEGIN, so "
        "two statements run in two transactions (two transaction ids), where inside "
        "engine.begin() they share one.",
        expected={"AUTOCOMMIT: distinct xids": 2, "engine.begin(): distinct xids": 1},
        observed={
            "AUTOCOMMIT: distinct xids": len(set(xids)),
            "engine.begin(): distinct xids": len(set(same_xid)),
        },
    )
    lab.note(
        f"AUTOCOMMIT: the xids {', '.join(xids)}; SHOW transaction_isolation there says {level}"
    )
    lab.check(
        "CREATE INDEX CONCURRENTLY works on an AUTOCOMMIT connection",
        "On a connection with execution_options(isolation_level='AUTOCOMMIT') the same "
        "statement succeeds and the index is valid in pg_indexes; the finally's DROP INDEX "
        "CONCURRENTLY (also AUTOCOMMIT) removes it.",
        expected={"CREATE INDEX CONCURRENTLY": "ok", "valid indexes": 1, "after the drop": 0},
        observed={
            "CREATE INDEX CONCURRENTLY": created,
            "valid indexes": found,
            "after the drop": left,
        },
    )
