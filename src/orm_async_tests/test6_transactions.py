"""Experiment 6: transactions, savepoints and isolation levels.

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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from sqlalchemy import func, inspect, select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from .capture import captured
from .db import create_session_factory
from .harness import Lab, describe, experiment, first_line, outcome, sqlstate
from .models import User, UserStatus

SERIALIZATION_FAILURE = "40001"
READ_COMMITTED, REPEATABLE_READ, SERIALIZABLE = "READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"
LEVELS = (READ_COMMITTED, REPEATABLE_READ, SERIALIZABLE)
BOUND = 30.0  # seconds: the outer guard around every scenario; lock_timeout trips first

T = TypeVar("T")


class Abort(Exception):
    """Raised on purpose inside ``sessions.begin()`` to see the block roll back."""


def server_error(exc: BaseException | None) -> str:
    """The server's message, DETAIL and HINT, as PostgreSQL sent them (from asyncpg's error)."""
    if exc is None:
        return "no error"
    orig = getattr(exc, "orig", None) or exc
    driver = orig.__cause__ or orig  # the asyncpg exception behind the dialect's wrapper
    text_ = first_line(driver)
    for part in ("detail", "hint"):
        value = getattr(driver, part, None)
        if value:
            text_ += f" {part.upper()}: {value}"
    return text_


def is_serialization_failure(exc: BaseException) -> bool:
    return isinstance(exc, DBAPIError) and sqlstate(exc) == SERIALIZATION_FAILURE


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


# ---------------------------------------------------------------------------------------------
# 1. sessions.begin() and begin_nested()


async def begin_blocks(lab: Lab) -> None:
    committed, rolled_back = f"{lab.tag}begin-ok", f"{lab.tag}begin-aborted"
    async with lab.sessions.begin() as session:
        session.add(User(username=committed))  # no commit() call: the block commits
    raised = "nothing raised"
    flushed = False
    try:
        async with lab.sessions.begin() as session:
            session.add(User(username=rolled_back))
            await session.flush()  # the INSERT reached the server...
            flushed = (
                await session.scalar(
                    select(func.count()).select_from(User).where(User.username == rolled_back)
                )
                == 1
            )
            raise Abort("give up")  # ...and the block's exit rolls it back
    except Abort as exc:
        raised = describe(exc)
    found_ok = await count_users(lab.sessions, committed)
    found_aborted = await count_users(lab.sessions, rolled_back)
    lab.check(
        "sessions.begin(): commit on success, rollback on exception",
        "`async with sessions.begin()` commits when the block ends normally (no commit() "
        "call needed) and rolls back when it raises, even after a flush sent the INSERT; "
        "the exception still propagates.",
        expected="ok block: 1 row; raising block: flushed, Abort re-raised, 0 rows",
        observed=f"ok block: {found_ok} row; raising block: "
        f"{'flushed' if flushed else 'not flushed'}, {raised}, {found_aborted} rows",
        passed=found_ok == 1 and flushed and raised.startswith("Abort") and found_aborted == 0,
    )


async def savepoints(lab: Lab) -> None:
    taken = f"{lab.tag}taken"
    first, second = f"{lab.tag}nested-a", f"{lab.tag}nested-b"
    async with lab.sessions.begin() as session:
        session.add(User(username=taken))

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
            duplicate_state = "transient" if inspect(duplicate).transient else "still attached"
            a_state = "persistent" if inspect(user_a).persistent else "not persistent"
            session.add(User(username=second))
    savepoint_sql = [s for s in sent if "SAVEPOINT" in s.upper()]
    found = {name: await count_users(lab.sessions, name) for name in (first, second, taken)}
    lab.check(
        "begin_nested(): an inner failure is undone, the outer work commits",
        "Inside begin_nested() (a SAVEPOINT) a duplicate username raises IntegrityError; "
        "leaving the block rolls back to the savepoint only, so user A (flushed before) and "
        "user B (added after) commit, and the duplicate is not there.",
        expected=f"IntegrityError (sqlstate 23505); A: 1, B: 1, '{taken}': 1",
        observed=f"{describe(error) if error else 'no error'} (sqlstate "
        f"{sqlstate(error) if error else None}); A: {found[first]}, B: {found[second]}, "
        f"'{taken}': {found[taken]}",
        passed=error is not None
        and sqlstate(error) == "23505"
        and found == {first: 1, second: 1, taken: 1},
    )
    lab.check(
        "begin_nested() sends SAVEPOINT and ROLLBACK TO SAVEPOINT",
        "The nested transaction is plain SQL on the same connection: SAVEPOINT when it "
        "begins, ROLLBACK TO SAVEPOINT when the block raises (no RELEASE).",
        expected="SAVEPOINT x, ROLLBACK TO SAVEPOINT x",
        observed=", ".join(savepoint_sql) or "no savepoint statement",
        passed=len(savepoint_sql) == 2
        and savepoint_sql[0].upper().startswith("SAVEPOINT ")
        and savepoint_sql[1].upper().startswith("ROLLBACK TO SAVEPOINT ")
        and savepoint_sql[0].split()[-1] == savepoint_sql[1].split()[-1],
    )
    lab.check(
        "objects added inside the rolled-back savepoint are expunged",
        "After ROLLBACK TO SAVEPOINT the session forgets the objects added inside it (the "
        "duplicate is transient again), while objects flushed before the savepoint stay "
        "persistent.",
        expected="duplicate: transient; A: persistent",
        observed=f"duplicate: {duplicate_state}; A: {a_state}",
    )

    # the same failure without a savepoint takes the whole transaction with it
    plain = f"{lab.tag}plain-a"
    async with lab.sessions() as session:
        session.add(User(username=plain))
        await session.flush()
        session.add(User(username=taken))
        flush_error = await outcome(session.flush())
        next_statement = await outcome(session.execute(select(1)))
        await session.rollback()
    lost = await count_users(lab.sessions, plain)
    lab.check(
        "without a savepoint the failure loses the earlier work",
        "The same duplicate without begin_nested(): the session refuses every further "
        "statement (PendingRollbackError) until rollback(), and user A, flushed before the "
        "failure, is gone.",
        expected="IntegrityError, then PendingRollbackError; A: 0 rows",
        observed=f"{flush_error.split(':')[0]}, then {next_statement.split(':')[0]}; "
        f"A: {lost} rows",
        passed=flush_error.startswith("IntegrityError")
        and next_statement.startswith("PendingRollbackError")
        and lost == 0,
    )
    lab.note(f"PendingRollbackError says: {next_statement}")


# ---------------------------------------------------------------------------------------------
# 2. choosing and verifying the level


async def levels(lab: Lab) -> None:
    # a one-connection engine: every session below gets the same server connection
    engine = lab.engine_with(pool_size=1, max_overflow=0)
    sessions = create_session_factory(engine)
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
    engine_wide = create_session_factory(engine.execution_options(isolation_level=SERIALIZABLE))
    async with engine_wide() as session:
        shown["engine.execution_options(SERIALIZABLE)"] = str(
            await session.scalar(text("SHOW transaction_isolation"))
        )
        pids.add(int(await session.scalar(text(pid)) or 0))
    async with sessions() as session:
        after = str(await session.scalar(text("SHOW transaction_isolation")))
        default = str(await session.scalar(text("SHOW default_transaction_isolation")))
        pids.add(int(await session.scalar(text(pid)) or 0))
    wanted = {
        **{level: level.lower() for level in LEVELS},
        "engine.execution_options(SERIALIZABLE)": "serializable",
    }
    lab.check(
        "the server runs each transaction at the level asked for",
        "session.connection(execution_options={'isolation_level': L}) before the first "
        "statement, or a session bound to engine.execution_options(isolation_level=L), "
        "makes the server report L in SHOW transaction_isolation.",
        expected="; ".join(f"{k}: {v}" for k, v in wanted.items()),
        observed="; ".join(f"{k}: {v}" for k, v in shown.items()),
        passed=shown == wanted,
    )
    lab.check(
        "the level does not leak through the pool",
        "When the session closes, SQLAlchemy restores the connection's default level: the "
        "next session on the same pooled connection (same backend pid) is back to the "
        "server default.",
        expected=f"1 backend; next session: {default}",
        observed=f"{len(pids)} backend(s); next session: {after}",
        passed=len(pids) == 1 and after == default,
    )
    lab.check(
        "no SET TRANSACTION is sent: asyncpg begins with the level itself",
        "With asyncpg, the level is not a SQL statement SQLAlchemy executes: the cursor "
        "events (and so echo) show no SET TRANSACTION ISOLATION LEVEL, only the SHOW, yet "
        "the server reports the level. Per the dialect source, asyncpg's transaction() sends "
        "BEGIN ISOLATION LEVEL ... itself.",
        expected="SHOW transaction_isolation x3",
        observed=", ".join(statements_sent) or "nothing",
        passed=statements_sent == ["SHOW transaction_isolation"] * len(LEVELS),
    )

    # too late: the transaction has already begun
    async with sessions() as session:
        await session.execute(select(1))
        with captured(collect=False) as got:
            await session.connection(execution_options={"isolation_level": SERIALIZABLE})
        late = str(await session.scalar(text("SHOW transaction_isolation")))
    messages = [str(w.message) for w in got.caught]
    lab.check(
        "asking for a level after the first statement is ignored (a warning)",
        "Once the session's transaction has used the connection, "
        "session.connection(execution_options=...) cannot change the level: SQLAlchemy "
        "only warns and the transaction stays at the default level.",
        expected=f"a warning 'execution_options ignored'; level: {default}",
        observed=f"{'; '.join(messages) or 'no warning'}; level: {late}",
        passed=any("execution_options ignored" in m for m in messages) and late == default,
    )


# ---------------------------------------------------------------------------------------------
# 3. anomalies, interleaved step by step


@dataclass
class Reread:
    level: str
    first: int
    second: int
    write: str
    final: int


async def non_repeatable_read(lab: Lab, level: str, name: str, lock_timeout_ms: int) -> Reread:
    """T1 reads login_count; T2 increments it and commits; T1 reads again, then writes
    ``first + 1`` (an increment computed from its first read)."""
    async with asyncio.timeout(BOUND), lab.sessions() as t1:
        shown = await begin_at(t1, level, lock_timeout_ms)
        read = select(User.login_count).where(User.username == name)
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
            write = f"{describe(exc)} (sqlstate {sqlstate(exc)})"
            lab.note(f"{level}, the write after a concurrent update: {server_error(exc)}")
            await t1.rollback()
    async with lab.sessions() as session:
        final = int(await session.scalar(read) or 0)
    return Reread(shown, first, second, write, final)


@dataclass
class Skew:
    shown: list[str] = field(default_factory=list)
    seen: list[int] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)
    failure: DBAPIError | None = None
    committed: int = 0
    active_after: int = -1


async def write_skew(lab: Lab, level: str, pair: tuple[str, str], lock_timeout_ms: int) -> Skew:
    """Two on-call users must keep at least one active. T1 and T2 both check that both are
    active, then T1 suspends the first and T2 the second; then both commit."""
    await make_active(lab.sessions, pair)
    skew = Skew()
    async with asyncio.timeout(BOUND), lab.sessions() as t1, lab.sessions() as t2:
        tx = {"T1": t1, "T2": t2}
        for session in tx.values():
            skew.shown.append(await begin_at(session, level, lock_timeout_ms))
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
                skew.failure = skew.failure or exc
                skew.steps.append(f"{label}: {type(exc).__name__} sqlstate {sqlstate(exc)}")
                failed.add(who)
                await tx[who].rollback()
                continue
            skew.steps.append(f"{label}: ok")
            skew.committed += "commits" in label
    async with lab.sessions() as session:
        skew.active_after = await count_active(session, pair)
    return skew


async def anomalies(lab: Lab, lock_timeout_ms: int, max_attempts: int) -> None:
    reader = f"{lab.tag}counter"
    pair = (f"{lab.tag}oncall-a", f"{lab.tag}oncall-b")
    async with lab.sessions.begin() as session:
        session.add_all(User(username=name) for name in (reader, *pair))

    rc = await non_repeatable_read(lab, READ_COMMITTED, reader, lock_timeout_ms)
    rr = await non_repeatable_read(lab, REPEATABLE_READ, reader, lock_timeout_ms)
    lab.check(
        "non-repeatable read: READ COMMITTED vs REPEATABLE READ",
        "T1 reads login_count, T2 increments it and commits, T1 reads again: under READ "
        "COMMITTED each statement takes a new snapshot, so the second read sees T2's "
        "commit; under REPEATABLE READ both reads use the transaction's first snapshot.",
        expected="read committed: 0 then 1; repeatable read: same value twice",
        observed=f"{rc.level}: {rc.first} then {rc.second}; "
        f"{rr.level}: {rr.first} then {rr.second}",
        passed=rc.level == "read committed"
        and rr.level == "repeatable read"
        and rc.second == rc.first + 1
        and rr.second == rr.first,
    )
    lab.check(
        "lost update: allowed by READ COMMITTED, refused by REPEATABLE READ",
        "T1 then writes login_count = (its first read) + 1. READ COMMITTED lets the write "
        "overwrite T2's increment (two increments, the counter moved by one); REPEATABLE "
        "READ refuses to update a row changed since its snapshot: SQLSTATE 40001 'could "
        "not serialize access due to concurrent update'.",
        expected="read committed: committed, counter 1 after 2 increments; repeatable read: "
        "DBAPIError ... could not serialize access due to concurrent update (sqlstate 40001)",
        observed=f"read committed: {rc.write}, counter {rc.final} after 2 increments; "
        f"repeatable read: {rr.write}",
        passed=rc.write == "committed"
        and rc.final == rc.first + 1
        and "could not serialize access due to concurrent update" in rr.write
        and rr.write.endswith(f"(sqlstate {SERIALIZATION_FAILURE})"),
    )

    skews = {level: await write_skew(lab, level, pair, lock_timeout_ms) for level in LEVELS}
    for level in (READ_COMMITTED, REPEATABLE_READ):
        skew = skews[level]
        lab.check(
            f"write skew commits under {level}",
            f"Under {level} both transactions see 2 active users, each suspends a different "
            "one, both commit without any error: 0 active remain, an outcome no serial order "
            "of the two could produce.",
            expected="both saw 2; 2 commits; 0 active",
            observed=f"level {'/'.join(sorted(set(skew.shown)))}; both saw "
            f"{'/'.join(map(str, skew.seen))}; {skew.committed} commits; "
            f"{skew.active_after} active",
            passed=set(skew.shown) == {level.lower()}
            and skew.seen == [2, 2]
            and skew.committed == 2
            and skew.failure is None
            and skew.active_after == 0,
        )
    ser = skews[SERIALIZABLE]
    message = first_line(ser.failure.orig or ser.failure) if ser.failure else "no error"
    lab.check(
        "SERIALIZABLE stops write skew with a serialization failure",
        "Under SERIALIZABLE the same interleaving ends with one transaction failing with "
        "SQLSTATE 40001 (read/write dependencies among transactions) and the other "
        "committing: 1 active user remains. Both UPDATEs succeed; the failure surfaces at "
        "the second COMMIT, so a retry must wrap the commit too. SQLAlchemy raises a plain "
        "DBAPIError (no subclass), the SQLSTATE is in .orig.sqlstate.",
        expected="DBAPIError, sqlstate 40001, 'could not serialize access due to read/write "
        "dependencies among transactions'; 1 commit; 1 active; fails at: T2 commits",
        observed=f"{type(ser.failure).__name__}, sqlstate "
        f"{sqlstate(ser.failure) if ser.failure else None}, '{message}'; "
        f"{ser.committed} commit(s); {ser.active_after} active "
        f"[{'; '.join(ser.steps)}]",
        passed=ser.failure is not None
        and type(ser.failure) is DBAPIError
        and is_serialization_failure(ser.failure)
        and "read/write dependencies among transactions" in message
        and ser.committed == 1
        and ser.active_after == 1
        and any(step.startswith("T2 commits: DBAPIError") for step in ser.steps),
    )
    lab.note(f"SERIALIZABLE write skew, the server's error: {server_error(ser.failure)}")

    await retry_loop(lab, pair, lock_timeout_ms, max_attempts)


# ---------------------------------------------------------------------------------------------
# 4. retrying serialization failures


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


async def retry_loop(
    lab: Lab, pair: tuple[str, str], lock_timeout_ms: int, max_attempts: int
) -> None:
    await make_active(lab.sessions, pair)
    me, other = pair
    seen: list[int] = []

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
                max_attempts=max_attempts,
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
        expected="attempts > 1, the first failure 40001; last attempt saw 1 and refrained; "
        "1 active",
        observed=f"{result.attempts} attempts ({'; '.join(result.failures)}); saw "
        f"{'/'.join(map(str, seen))}; suspended: {result.value}; {active_after} active",
        passed=result.attempts > 1
        and SERIALIZATION_FAILURE in result.failures[0]
        and seen[-1] == 1
        and result.value is False
        and active_after == 1,
    )


# ---------------------------------------------------------------------------------------------
# 5. AUTOCOMMIT


async def autocommit(lab: Lab, statement_timeout_ms: int) -> None:
    index = f"ix_{lab.tag.replace('-', '_')}users_login_count"
    create = text(f"CREATE INDEX CONCURRENTLY {index} ON users (login_count)")
    drop = text(f"DROP INDEX CONCURRENTLY IF EXISTS {index}")
    valid = text(
        "SELECT count(*) FROM pg_indexes i JOIN pg_class c ON c.relname = i.indexname "
        "JOIN pg_index x ON x.indexrelid = c.oid WHERE i.indexname = :name AND x.indisvalid"
    )
    listed = text("SELECT count(*) FROM pg_indexes WHERE indexname = :name")
    timeouts = [
        text(f"SET {name} = {int(statement_timeout_ms)}")
        for name in ("statement_timeout", "lock_timeout")
    ]
    # its own engine: the session-level SETs below stay on its connection, disposed after the run
    engine = lab.engine_with(pool_size=1, max_overflow=0)

    in_transaction = created = "not run"
    xids: list[str] = []
    level = "?"
    found = left = -1
    try:
        try:
            async with engine.begin() as conn:
                await conn.execute(
                    text(f"SET LOCAL statement_timeout = {int(statement_timeout_ms)}")
                )
                await conn.execute(create)
            in_transaction = "ok"
        except DBAPIError as exc:
            in_transaction = f"{describe(exc)} (sqlstate {sqlstate(exc)})"
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
        expected="DBAPIError ... CREATE INDEX CONCURRENTLY cannot run inside a transaction "
        "block (sqlstate 25001)",
        observed=in_transaction,
        passed="CREATE INDEX CONCURRENTLY cannot run inside a transaction block" in in_transaction
        and in_transaction.endswith("(sqlstate 25001)"),
    )
    lab.check(
        "AUTOCOMMIT: each statement is its own transaction",
        "isolation_level='AUTOCOMMIT' puts the driver connection in autocommit: no BEGIN, so "
        "two statements run in two transactions (two transaction ids), where inside "
        "engine.begin() they share one.",
        expected="AUTOCOMMIT: 2 different xids; in a transaction: 1 xid",
        observed=f"AUTOCOMMIT: {len(set(xids))} different xids ({', '.join(xids)}), "
        f"transaction_isolation shows {level}; in a transaction: {len(set(same_xid))} xid",
        passed=len(set(xids)) == 2 and len(set(same_xid)) == 1,
    )
    lab.check(
        "CREATE INDEX CONCURRENTLY works on an AUTOCOMMIT connection",
        "On a connection with execution_options(isolation_level='AUTOCOMMIT') the same "
        "statement succeeds and the index is valid in pg_indexes; the finally's DROP INDEX "
        "CONCURRENTLY (also AUTOCOMMIT) removes it.",
        expected="ok; 1 valid index; 0 after the drop",
        observed=f"{created}; {found} valid index; {left} after the drop",
        passed=created == "ok" and found == 1 and left == 0,
    )


@experiment(6, "Transactions, savepoints and isolation levels")
async def run(
    lab: Lab,
    *,
    lock_timeout_ms: int = 2000,
    statement_timeout_ms: int = 15000,
    max_attempts: int = 5,
) -> None:
    """What do sessions.begin() and begin_nested() commit or roll back, which anomalies does
    each PostgreSQL isolation level allow or stop (and with which error), how does a retry
    loop recover from a serialization failure, and how do you run a statement that cannot
    run inside a transaction?"""
    await begin_blocks(lab)
    await savepoints(lab)
    await levels(lab)
    await anomalies(lab, lock_timeout_ms, max_attempts)
    await autocommit(lab, statement_timeout_ms)
