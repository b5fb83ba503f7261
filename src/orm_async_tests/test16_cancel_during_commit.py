"""When a task is cancelled while its COMMIT is on the wire (a sibling in its
``asyncio.TaskGroup`` fails), is the row committed on the server or not, what can the
cancelled task know about it, what is left in the pool, and do ``asyncio.shield`` and an
idempotency key make the outcome safe?

COMMIT is made slow deterministically: the scratch table has a ``DEFERRABLE INITIALLY
DEFERRED`` constraint trigger whose function runs ``pg_sleep(delay)`` for each inserted
row, and a deferred trigger fires at COMMIT, so the INSERT returns at once and the COMMIT
lasts ``commit_sleep`` seconds. A writer task inserts one row in an ``AsyncSession`` and
commits; its sibling in the same ``TaskGroup`` waits ``fail_after`` seconds from the
moment the COMMIT is sent, looks at the writer's backend in ``pg_stat_activity`` (it must
be running the COMMIT, waiting in ``PgSleep``) and raises. The TaskGroup cancels the
writer. Every run is bounded (``asyncio.timeout``): a hang (the symptom of
sqlalchemy#12728) becomes a failed check. Each race runs on its own one-connection engine
whose ``application_name`` names it, so the server's view of that engine's backends is
exact; warnings (garbage-collected connections included) are captured around each race.

The trigger comes in two flavours: an ordinary one, which a CancelRequest interrupts (the
COMMIT fails and the transaction rolls back), and a "late cancel" one that traps
``query_canceled`` in PL/pgSQL, records that the cancel arrived, and lets the COMMIT
finish. The second stands for a cancel that reaches the server too late to stop the
commit (after the commit point, or during a wait PostgreSQL does not abort on a cancel,
such as synchronous replication, which warns that the transaction "has already committed
locally"): a race that real code cannot control, reproduced here on purpose.

Then the fixes: ``asyncio.shield`` around ``session.commit()`` — alone, and with the
commit's task kept and awaited before the session is closed — and an idempotency key (a
``UNIQUE`` column), with which a retry after an unknown outcome either inserts the row or
gets a unique violation, never a second row.

Observed (the same on asyncpg and psycopg, SQLAlchemy 2.0 and 2.1, embedded PostgreSQL
18 and PostgreSQL 15): the writer gets a bare ``CancelledError`` about 0.16 s after the
COMMIT was sent, and the TaskGroup raises only the sibling's error and ends within
milliseconds of it — no hang. Both drivers answer the cancellation with a CancelRequest
that reaches the server while the trigger sleeps, so with the ordinary trigger the COMMIT
is cancelled and the row is not there; the paths differ (as the drivers' source and
experiment 10 show: psycopg sends the cancel and waits for the server's answer before
re-raising; asyncpg re-raises at once and sends the cancel in the background, and
SQLAlchemy's invalidation then closes the connection gracefully, ``close(timeout=2)``,
which waits for the server), the outcome does not. With the late-cancel trigger the
server records the cancel and commits the row anyway. The cancelled task's view is
identical in both cases: ``CancelledError`` (no DBAPI error, nothing about the
outcome), ``session.in_transaction()`` still ``True``, ``is_active`` ``False``, and the
next statement refused with ``InvalidRequestError`` "This session is in 'prepared'
state": the task cannot know whether it committed. The pool is clean each time: the
connection is invalidated (one ``invalidate`` event, ``CancelledError``), nothing stays
checked out, no backend of the engine is left, no warning. ``asyncio.shield`` alone lets
the COMMIT complete (the row is there) but the writer's ``async with`` then closes the
session under the running commit: the TaskGroup raises an ``IllegalStateChangeError``
next to the sibling's error and the connection stays checked out until the orphaned
commit ends. Shielding a task and awaiting it in ``except CancelledError`` before
re-raising is the fix: the row is committed, the writer still ends cancelled, the
session is out of its transaction, the connection goes back to the pool (not
invalidated), and the TaskGroup waits for the commit (at least ``commit_sleep`` seconds
from the COMMIT). After an unknown outcome a blind retry duplicates a commit that did
happen; with the idempotency key the retry inserts the missing row or gets
``IntegrityError`` SQLSTATE 23505 and finds the existing row, one row per key either way.

Sources: asyncio docs, "Task Groups" (the first failure cancels the remaining tasks,
whose ``CancelledError`` is not in the ``ExceptionGroup``), "Shielding From Cancellation"
(``shield`` protects the inner task, not the awaiting one; keep a reference to it);
PostgreSQL docs, ``CREATE TRIGGER`` (constraint triggers, ``DEFERRABLE INITIALLY
DEFERRED``: fired at the end of the transaction), protocol "Canceling Requests in
Progress" (a cancel may or may not have an effect; arriving after the command is done it
has none), PL/pgSQL "Trapping Errors" (``query_canceled`` is trapped only by name) and
"Synchronous Replication" (a cancelled wait leaves the transaction committed locally);
SQLAlchemy docs, "Error Messages" - "IllegalStateChangeError and concurrency exceptions",
and "Dealing with Disconnects" (an exit exception such as ``CancelledError`` invalidates
the connection). Issue threads, as observed here: sqlalchemy#12728 (gather/TaskGroup,
one task fails while another's COMMIT is in progress, the program hangs; fixed by
re-raising ``CancelledError`` in the asyncpg dialect's terminate, while the maintainer
also reproduced a hang with asyncpg alone): not reproduced, the group ends within
milliseconds on both lines and both drivers, consistent with that re-raise being in the
2.0.58 and 2.1.9 observed; sqlalchemy#11760 (cancelling a task that inserts in parallel
raises unexpected errors, "connection is closed"): not reproduced for a cancel during
COMMIT, the cancelled task gets a clean ``CancelledError`` and the sibling's error is
the only one in the group — except with a bare ``asyncio.shield``, where the group gets
an unexpected ``IllegalStateChangeError``; sqlalchemy#10094: not found in the issue
corpus searched here, so nothing is claimed about it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    MetaData,
    String,
    Table,
    false,
    func,
    insert,
    select,
    text,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from .lab import (
    BadSizes,
    Lab,
    at_least,
    describe,
    experiment,
    less_than,
    matches,
    outcome,
    prefix,
    probes,
    sqlstate,
)
from .lab.capture import captured
from .lab.probes import checked_out

BOUND = 5.0
"""Upper bound (s) of every wait in this module: a hang becomes a failed check."""
CANCEL_ROOM = 0.2
"""Seconds the trigger must still sleep after the sibling fails, for the cancel to land."""


@dataclass(frozen=True)
class Sizes:
    commit_sleep: float = 0.5
    """Seconds the deferred constraint trigger sleeps (pg_sleep) at COMMIT, per slow row."""
    fail_after: float = 0.15
    """Seconds after the writer sends COMMIT that its sibling task raises."""

    def __post_init__(self) -> None:
        if self.fail_after <= 0:
            raise BadSizes(f"fail_after ({self.fail_after:g} s) must be above 0")
        if self.commit_sleep - self.fail_after < CANCEL_ROOM:
            raise BadSizes(
                f"commit_sleep ({self.commit_sleep:g} s) must exceed fail_after "
                f"({self.fail_after:g} s) by at least {CANCEL_ROOM:g} s, or the sibling fails "
                "after the COMMIT is over"
            )
        if self.commit_sleep > BOUND / 2:
            raise BadSizes(
                f"commit_sleep ({self.commit_sleep:g} s) must be at most {BOUND / 2:g} s, "
                f"half the {BOUND:g} s bound of every wait here"
            )


run = experiment(16, "Cancellation while COMMIT is in flight", Sizes)


# ---------------------------------------------------------------- the scratch tables


@dataclass(frozen=True)
class Scratch:
    """The scratch tables: ``orders`` (with the slow deferred trigger) and ``cancels``
    (where the late-cancel trigger records each cancel it swallowed)."""

    orders: Table
    cancels: Table


def scratch_tables(prefix_: str) -> Scratch:
    metadata = MetaData()
    orders = Table(
        f"{prefix_}orders",
        metadata,
        Column("id", BigInteger, primary_key=True, autoincrement=True),
        Column("request", String(80), nullable=False),
        Column("idem_key", String(80), unique=True),
        Column("delay", Float, nullable=False, server_default=text("0")),
        Column("late_cancel", Boolean, nullable=False, server_default=false()),
    )
    cancels = Table(f"{prefix_}cancels", metadata, Column("request", String(80), nullable=False))
    return Scratch(orders, cancels)


def function_name(lab: Lab[Sizes]) -> str:
    return f"{lab.tag.replace('-', '_')}slow_commit"


@asynccontextmanager
async def scratch(lab: Lab[Sizes]) -> AsyncIterator[Scratch]:
    """The tables, the trigger function and the constraint trigger, in the run's schema;
    dropped after the run."""
    found = scratch_tables(lab.tag.replace("-", "_"))
    orders, cancels = found.orders.name, found.cancels.name
    function = function_name(lab)
    async with lab.engine.begin() as conn:
        schema = str(await conn.scalar(text("SELECT current_schema()")))
        await conn.run_sync(found.orders.metadata.create_all)
        # a deferred trigger runs at COMMIT: the INSERT returns at once, the COMMIT sleeps
        await conn.execute(
            text(
                f'CREATE FUNCTION "{schema}"."{function}"() RETURNS trigger '
                "LANGUAGE plpgsql AS $$\n"
                "BEGIN\n"
                "  BEGIN\n"
                "    PERFORM pg_sleep(NEW.delay);\n"
                "  EXCEPTION WHEN query_canceled THEN\n"
                "    IF NOT NEW.late_cancel THEN RAISE; END IF;\n"
                f'    INSERT INTO "{schema}"."{cancels}" (request) VALUES (NEW.request);\n'
                "  END;\n"
                "  RETURN NULL;\n"
                "END $$"
            )
        )
        await conn.execute(
            text(
                f'CREATE CONSTRAINT TRIGGER "{function}" AFTER INSERT ON "{schema}"."{orders}" '
                "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
                f'EXECUTE FUNCTION "{schema}"."{function}"()'
            )
        )
    try:
        yield found
    finally:
        async with lab.engine.begin() as conn:
            await conn.execute(text("SET LOCAL lock_timeout = '10s'"))
            await conn.run_sync(found.orders.metadata.drop_all)
            await conn.execute(text(f'DROP FUNCTION IF EXISTS "{schema}"."{function}"()'))


async def count(lab: Lab[Sizes], table: Table, **where: str) -> int:
    """Rows of ``table`` whose columns equal ``where``, read on a connection of its own."""
    query = select(func.count()).select_from(table)
    for name, value in where.items():
        query = query.where(table.c[name] == value)
    async with lab.engine.connect() as conn:
        return int(await conn.scalar(query) or 0)


async def activity(engine: AsyncEngine, pid: int | None) -> dict[str, str | None]:
    """``state``, ``query`` and ``wait_event`` of backend ``pid`` in pg_stat_activity."""
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text("SELECT state, query, wait_event FROM pg_stat_activity WHERE pid = :pid"),
                {"pid": pid or 0},
            )
        ).first()
    if row is None:
        return {"state": None, "query": None, "wait_event": None}
    return {"state": row.state, "query": row.query, "wait_event": row.wait_event}


IN_COMMIT = {"state": "active", "query": matches(r"^COMMIT;?$"), "wait_event": "PgSleep"}
"""A backend running COMMIT, inside the trigger's pg_sleep (asyncpg sends ``COMMIT;``)."""
PREPARED = prefix("InvalidRequestError: This session is in 'prepared' state")
"""What a session whose commit was interrupted says to its next statement."""


# ---------------------------------------------------------------- the race


class SiblingFailed(RuntimeError):
    """What the sibling task raises while the writer's COMMIT is in flight."""


@dataclass
class Writer:
    """What the task that commits knows, recorded where it catches its CancelledError."""

    pid: int | None = None
    raised: str = "nothing"
    seconds: float | None = None
    """From sending COMMIT to the exception."""
    in_transaction: bool | None = None
    is_active: bool | None = None
    next_statement: str | None = None
    commit_task: asyncio.Task[None] | None = None
    """With a shield: the task running ``session.commit()``."""
    shielded_commit: str | None = None
    """With a shield: how that task ended, if the writer waited for it."""

    def view(self) -> dict[str, Any]:
        """The writer's knowledge of its commit, as the checks compare it."""
        return {
            "raised": self.raised,
            "in_transaction()": self.in_transaction,
            "is_active": self.is_active,
            "next statement": self.next_statement,
        }


@dataclass
class Race:
    """One TaskGroup of a writer and a failing sibling, and what it left."""

    request: str
    app: str
    engine: AsyncEngine
    writer: Writer
    in_flight: dict[str, str | None]
    """The writer's backend as the sibling saw it just before raising."""
    group: list[str]
    """What the TaskGroup raised, one line per exception (sorted)."""
    bounded: bool
    """The TaskGroup ended within BOUND."""
    group_seconds: float
    """From sending COMMIT to the end of the TaskGroup."""
    checked_out_at_end: int
    invalidations: list[str]
    warnings: list[str] = field(default_factory=list)
    rows: int = 0
    cancels: int = 0
    backends: int = 0

    def pool(self) -> dict[str, Any]:
        return {
            "pool invalidate events": self.invalidations,
            "checked out": checked_out(self.engine),
            "engine's backends on the server": self.backends,
            "warnings": self.warnings,
        }


async def commit(session: AsyncSession, style: str, writer: Writer) -> None:
    """``session.commit()`` as ``style`` says: plainly, shielded, or shielded and waited for."""
    if style == "plain":
        await session.commit()
        return
    task: asyncio.Task[None] = asyncio.ensure_future(session.commit())
    writer.commit_task = task
    if style == "shield alone":
        await asyncio.shield(task)
        return
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        # the commit goes on: wait for it before the session is closed, then stay cancelled
        writer.shielded_commit = await outcome(task)
        raise


async def race(
    lab: Lab[Sizes], tables: Scratch, request: str, *, style: str, late_cancel: bool
) -> Race:
    """A writer inserting ``request`` (slow COMMIT) and a sibling failing mid-COMMIT, in one
    TaskGroup on a one-connection engine of their own."""
    size = lab.sizes
    app = lab.name(request)
    engine = lab.one_connection(application_name=app, pool_pre_ping=False, pool_timeout=BOUND)
    sessions = lab.sessions_on(engine)
    invalidations = probes.Invalidations.on(engine)
    writer = Writer()
    committing = asyncio.Event()
    sent: list[float] = []
    in_flight: dict[str, str | None] = {}

    async def write() -> None:
        async with sessions() as session:
            await session.execute(
                insert(tables.orders).values(
                    request=lab.name(request),
                    idem_key=lab.name(request),
                    delay=size.commit_sleep,
                    late_cancel=late_cancel,
                )
            )
            writer.pid = await probes.backend_pid(session)
            sent.append(time.perf_counter())
            committing.set()
            try:
                await commit(session, style, writer)
            except asyncio.CancelledError:
                writer.raised = "CancelledError"
                writer.seconds = time.perf_counter() - sent[0]
                writer.in_transaction = session.in_transaction()
                writer.is_active = session.is_active
                writer.next_statement = await outcome(session.execute(select(1)))
                raise

    async def fail() -> None:
        await committing.wait()
        await asyncio.sleep(size.fail_after)
        in_flight.update(await activity(lab.engine, writer.pid))
        raise SiblingFailed(f"the sibling fails {size.fail_after:g} s after the COMMIT")

    group: list[str] = []
    bounded = True
    with captured() as got:
        try:
            async with asyncio.timeout(BOUND), asyncio.TaskGroup() as tasks:
                tasks.create_task(write())
                tasks.create_task(fail())
        except TimeoutError:
            bounded = False
            group = [f"TimeoutError: the TaskGroup did not end within {BOUND:g} s"]
        except BaseExceptionGroup as raised:
            group = sorted(describe(e) for e in flatten(raised))
        ended = time.perf_counter()
        out_at_end = checked_out(engine)
        orphan = writer.commit_task
        if orphan is not None and writer.shielded_commit is None:
            # shield alone: the commit still runs after the writer is gone; wait (bounded)
            try:
                async with asyncio.timeout(BOUND):
                    writer.shielded_commit = await outcome(asyncio.shield(orphan))
            except TimeoutError:
                writer.shielded_commit = f"still running after {BOUND:g} s"
    found = Race(
        request,
        app,
        engine,
        writer,
        in_flight,
        group,
        bounded,
        ended - sent[0] if sent else float("nan"),
        out_at_end,
        invalidations.seen,
        got.warning_lines(" <"),
    )
    found.rows = await count(lab, tables.orders, request=lab.name(request))
    found.cancels = await count(lab, tables.cancels, request=lab.name(request))
    pooled = 0 if found.invalidations else 1
    found.backends = await probes.settle(lab.engine, app, pooled, within=BOUND / 2)
    if writer.seconds is not None:
        lab.figure(
            f"{request}: COMMIT sent → the writer handles its CancelledError", writer.seconds, "s"
        )
    lab.figure(f"{request}: COMMIT sent → TaskGroup ended", found.group_seconds, "s")
    return found


def flatten(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(flatten(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


@dataclass
class Ledger:
    """The races whose writer was cancelled, by request, for the retry scenario."""

    races: dict[str, Race] = field(default_factory=dict)


@asynccontextmanager
async def ledger(lab: Lab[Sizes]) -> AsyncIterator[Ledger]:
    yield Ledger()


def sibling_only(lab: Lab[Sizes]) -> list[str]:
    return [f"SiblingFailed: the sibling fails {lab.sizes.fail_after:g} s after the COMMIT"]


INVALIDATED_CLEANLY: dict[str, Any] = {
    "pool invalidate events": ["CancelledError"],
    "checked out": 0,
    "engine's backends on the server": 0,
    "warnings": [],
}
"""The pool after a cancelled race: the connection invalidated, nothing checked out,
no backend of the engine left, no warning."""


# ---------------------------------------------------------------- the scenarios


@run.scenario
async def a_slow_commit(lab: Lab[Sizes]) -> None:
    """One session inserts a row whose deferred trigger sleeps commit_sleep seconds and
    commits, no cancellation; the server's view of its backend is sampled during the
    COMMIT."""
    size = lab.sizes
    tables = await lab.use(scratch)
    app = lab.name("baseline")
    engine = lab.one_connection(application_name=app, pool_pre_ping=False)
    async with lab.sessions_on(engine)() as session:
        started = time.perf_counter()
        await session.execute(
            insert(tables.orders).values(
                request=lab.name("baseline"), idem_key=lab.name("baseline"), delay=size.commit_sleep
            )
        )
        inserted = time.perf_counter() - started
        pid = await probes.backend_pid(session)
        started = time.perf_counter()
        async with asyncio.timeout(BOUND):
            committing = asyncio.ensure_future(session.commit())
            seen = await probes.poll(
                lambda: activity(lab.engine, pid),
                lambda a: a["wait_event"] == "PgSleep" or committing.done(),
                within=BOUND,
                every=0.02,
            )
            await committing
        took = time.perf_counter() - started
    lab.figure("INSERT with the deferred trigger", inserted, "s")
    lab.figure("COMMIT that fires it", took, "s")
    lab.check(
        "the deferred trigger makes COMMIT, not INSERT, slow",
        f"The INSERT returns at once (the constraint trigger is DEFERRABLE INITIALLY "
        f"DEFERRED); the COMMIT fires it and lasts at least its pg_sleep({size.commit_sleep:g}), "
        "during which pg_stat_activity shows the backend active in COMMIT, waiting on "
        "PgSleep; then the row is committed.",
        expected={
            "INSERT took (s)": less_than(size.commit_sleep),
            "backend during the COMMIT": IN_COMMIT,
            "COMMIT took (s)": at_least(size.commit_sleep),
            "rows": 1,
        },
        observed={
            "INSERT took (s)": inserted,
            "backend during the COMMIT": seen.value,
            "COMMIT took (s)": took,
            "rows": await count(lab, tables.orders, request=lab.name("baseline")),
        },
    )


@run.scenario
async def cancelled_during_commit(lab: Lab[Sizes]) -> None:
    """A writer commits a slow row under an asyncio.TaskGroup; its sibling raises
    fail_after seconds after the COMMIT was sent. Then the rows, the writer's view, the
    pool and the server."""
    size = lab.sizes
    tables = await lab.use(scratch)
    book = await lab.use(ledger)
    found = await race(lab, tables, "cancelled", style="plain", late_cancel=False)
    book.races["cancelled"] = found
    lab.check(
        "the sibling's failure cancels the writer mid-COMMIT, and nothing hangs",
        "When the sibling raises, the writer's backend is running the COMMIT (inside the "
        "trigger's pg_sleep). The TaskGroup cancels the writer and raises an ExceptionGroup "
        "holding the sibling's error only (the writer's CancelledError is not in it); it "
        f"ends well before the trigger's {size.commit_sleep:g} s are over, and within the "
        f"{BOUND:g} s bound (sqlalchemy#12728 was a hang here).",
        expected={
            "writer's backend when the sibling failed": IN_COMMIT,
            "TaskGroup raised": sibling_only(lab),
            "ended within the bound": True,
            "COMMIT sent → TaskGroup ended (s)": less_than(size.commit_sleep),
        },
        observed={
            "writer's backend when the sibling failed": found.in_flight,
            "TaskGroup raised": found.group,
            "ended within the bound": found.bounded,
            "COMMIT sent → TaskGroup ended (s)": found.group_seconds,
        },
    )
    lab.check(
        "the cancelled COMMIT did not commit",
        "Both drivers answer the task's cancellation with a PostgreSQL CancelRequest, and it "
        "reaches the server while the deferred trigger still sleeps, so the COMMIT fails "
        "with query_canceled and the transaction is rolled back: the row is not there. "
        "The paths differ (see experiment 10): psycopg sends the cancel and waits for the "
        "server's answer before re-raising; asyncpg re-raises at once and cancels in the "
        "background, and SQLAlchemy's invalidation then closes the connection gracefully "
        "(it waits for the server). The outcome is the same.",
        expected={"rows": 0, "cancels swallowed by the trigger": 0},
        observed={"rows": found.rows, "cancels swallowed by the trigger": found.cancels},
    )
    lab.check(
        "the cancelled writer cannot know whether it committed",
        "The writer gets a bare CancelledError, no DBAPI error that would say the COMMIT "
        "failed; its session still reports a transaction (in_transaction() is True) that "
        "is no longer active, and refuses any further statement because the ORM "
        "transaction is in its 'prepared' state (commit begun, never finished). Nothing "
        "it can read tells committed from not committed.",
        expected={
            "raised": "CancelledError",
            "in_transaction()": True,
            "is_active": False,
            "next statement": PREPARED,
        },
        observed=found.writer.view(),
    )
    lab.check(
        "the pool after a cancelled COMMIT",
        "SQLAlchemy treats the CancelledError as an exit exception: it invalidates the "
        "connection (one pool invalidate event), so nothing stays checked out, the "
        "engine's only backend goes away (nothing left idle in transaction on the server), "
        "and no warning is emitted, garbage collection included.",
        expected=INVALIDATED_CLEANLY,
        observed=found.pool(),
    )


@run.scenario
async def the_cancel_arrives_too_late(lab: Lab[Sizes]) -> None:
    """The same race, with a row whose trigger traps query_canceled, records it in the
    cancels table and lets the COMMIT finish: a cancel that reaches the server too late
    to stop the commit."""
    tables = await lab.use(scratch)
    book = await lab.use(ledger)
    found = await race(lab, tables, "late-cancel", style="plain", late_cancel=True)
    book.races["late-cancel"] = found
    lab.check(
        "a cancel that comes too late: the row is committed",
        "The sibling fails while the writer's COMMIT is in the trigger, the TaskGroup "
        "raises only the sibling's error and the writer is cancelled as before; the cancel "
        "request does reach the server (the trigger records it), but the trigger carries "
        "on and the COMMIT commits the row.",
        expected={
            "writer's backend when the sibling failed": IN_COMMIT,
            "TaskGroup raised": sibling_only(lab),
            "cancels received by the trigger": 1,
            "rows": 1,
        },
        observed={
            "writer's backend when the sibling failed": found.in_flight,
            "TaskGroup raised": found.group,
            "cancels received by the trigger": found.cancels,
            "rows": found.rows,
        },
    )
    lab.check(
        "committed or not, the writer sees the same",
        "The writer's view is exactly that of the cancelled COMMIT (previous scenario): "
        "CancelledError, in_transaction() True, is_active False, the next statement refused "
        "in the 'prepared' state, while this time the row is committed. The outcome of a "
        "COMMIT interrupted by a cancellation is unknown to the task that sent it.",
        expected={
            "raised": "CancelledError",
            "in_transaction()": True,
            "is_active": False,
            "next statement": PREPARED,
        },
        observed=found.writer.view(),
    )
    lab.check(
        "the pool after a late cancel",
        "As with the cancelled COMMIT: the connection is invalidated, nothing stays "
        "checked out, no backend of the engine is left, no warning.",
        expected=INVALIDATED_CLEANLY,
        observed=found.pool(),
    )


@run.scenario
async def shield_alone(lab: Lab[Sizes]) -> None:
    """The race with the writer awaiting asyncio.shield(commit task) and nothing more: its
    ``async with`` session block exits on the CancelledError while the commit still runs.
    The orphaned commit is awaited afterwards (bounded)."""
    tables = await lab.use(scratch)
    found = await race(lab, tables, "shield-alone", style="shield alone", late_cancel=False)
    lab.check(
        "asyncio.shield alone: the commit completes, the session is closed under it",
        "The shield keeps the COMMIT running after the writer is cancelled, and the row is "
        "committed; but the writer's `async with` block closes the session at once, while "
        "the commit is in progress: SQLAlchemy refuses with IllegalStateChangeError, which "
        "the TaskGroup raises next to the sibling's error, and the connection stays checked "
        "out when the group ends, until the orphaned commit finishes.",
        expected={
            "TaskGroup raised": [  # sorted by text, as observed
                prefix("IllegalStateChangeError: Method 'close()' can't be called here"),
                *sibling_only(lab),
            ],
            "checked out when the TaskGroup ended": 1,
            "the orphaned commit": "ok",
            "rows": 1,
            "checked out after it": 0,
            "pool invalidate events": [],
            "warnings": [],
        },
        observed={
            "TaskGroup raised": found.group,
            "checked out when the TaskGroup ended": found.checked_out_at_end,
            "the orphaned commit": found.writer.shielded_commit,
            "rows": found.rows,
            "checked out after it": checked_out(found.engine),
            "pool invalidate events": found.invalidations,
            "warnings": found.warnings,
        },
    )


@run.scenario
async def shield_and_wait(lab: Lab[Sizes]) -> None:
    """The race with the writer shielding the commit's task and, on CancelledError,
    awaiting that task before re-raising (so the session closes after the commit)."""
    size = lab.sizes
    tables = await lab.use(scratch)
    found = await race(lab, tables, "shielded", style="shield and wait", late_cancel=False)
    lab.check(
        "fix: shield the commit and wait for it",
        "asyncio.shield(task) plus `await task` in `except CancelledError` before re-raising: "
        "the COMMIT completes and the row is there, the writer still ends cancelled (the "
        "TaskGroup raises only the sibling's error), the session is out of its transaction, "
        "the connection goes back to the pool instead of being invalidated (its backend "
        "stays, idle, in the pool), and the TaskGroup waits for the commit: it ends at least "
        f"commit_sleep ({size.commit_sleep:g} s) after the COMMIT was sent.",
        expected={
            "writer raised": "CancelledError",
            "the shielded commit": "ok",
            "in_transaction() then": False,
            "TaskGroup raised": sibling_only(lab),
            "rows": 1,
            "COMMIT sent → TaskGroup ended (s)": at_least(size.commit_sleep),
            "pool invalidate events": [],
            "checked out": 0,
            "engine's backends on the server": 1,
            "warnings": [],
        },
        observed={
            "writer raised": found.writer.raised,
            "the shielded commit": found.writer.shielded_commit,
            "in_transaction() then": found.writer.in_transaction,
            "TaskGroup raised": found.group,
            "rows": found.rows,
            "COMMIT sent → TaskGroup ended (s)": found.group_seconds,
            **found.pool(),
        },
    )


async def retry(lab: Lab[Sizes], tables: Scratch, request: str, *, key: bool) -> dict[str, Any]:
    """Insert ``request`` again (quickly, no sleep), with its idempotency key or without."""
    name = lab.name(request)
    try:
        async with asyncio.timeout(BOUND), lab.sessions.begin() as session:
            await session.execute(
                insert(tables.orders).values(request=name, idem_key=name if key else None)
            )
    except IntegrityError as err:
        return {"retry": describe(err), "SQLSTATE": sqlstate(err)}
    return {"retry": "ok", "SQLSTATE": None}


@run.scenario
async def retry_with_an_idempotency_key(lab: Lab[Sizes]) -> None:
    """After the two cancelled writers (COMMIT cancelled, cancel too late) each request is
    retried with its idempotency key; then the late one is retried blindly, without it."""
    tables = await lab.use(scratch)
    book = await lab.use(ledger)
    missing = {"cancelled", "late-cancel"} - set(book.races)
    if missing:
        lab.skip(f"the scenario(s) of {', '.join(sorted(missing))} did not run before this one")
    keyed = {request: await retry(lab, tables, request, key=True) for request in book.races}
    after_keyed = {
        request: await count(lab, tables.orders, idem_key=lab.name(request))
        for request in book.races
    }
    blind = await retry(lab, tables, "late-cancel", key=False)
    duplicated = await count(lab, tables.orders, request=lab.name("late-cancel"))
    lab.check(
        "a retry with the idempotency key never duplicates",
        "Both writers saw the same CancelledError; retried with the same key, the request "
        "whose COMMIT was cancelled is inserted now, and the one that was committed anyway "
        "gets a unique violation (IntegrityError, SQLSTATE 23505) and finds its row by the "
        "key: one row per key either way.",
        expected={
            "cancelled: retry": "ok",
            "cancelled: rows with the key": 1,
            "late cancel: retry": prefix("IntegrityError: duplicate key value violates unique"),
            "late cancel: SQLSTATE": "23505",
            "late cancel: rows with the key": 1,
        },
        observed={
            "cancelled: retry": keyed["cancelled"]["retry"],
            "cancelled: rows with the key": after_keyed["cancelled"],
            "late cancel: retry": keyed["late-cancel"]["retry"],
            "late cancel: SQLSTATE": keyed["late-cancel"]["SQLSTATE"],
            "late cancel: rows with the key": after_keyed["late-cancel"],
        },
    )
    lab.check(
        "a blind retry duplicates a commit that did happen",
        "Retried without the key (what a retry that trusts the CancelledError does), the "
        "committed-anyway request is inserted a second time: two rows for one request.",
        expected={"blind retry": "ok", "rows for the request": 2},
        observed={"blind retry": blind["retry"], "rows for the request": duplicated},
    )
