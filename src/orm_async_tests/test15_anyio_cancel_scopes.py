"""When an anyio cancel scope (a task group, move_on_after, fail_after: how Starlette and
FastAPI cancel a request handler or its background work) cancels SQLAlchemy asyncio work
while it waits for a pooled connection, pre-pings it, runs a query, streams a result or
closes its session, what exception does the code see, is the connection returned to the
pool or invalidated, is any left checked out, does the server-side query stop, and how
does that differ from asyncio.timeout and between asyncpg and psycopg?

An anyio scope differs from ``asyncio.timeout`` in one way that matters here: once
cancelled, it cancels *every* await inside it again (on asyncio, anyio re-delivers
``task.cancel()`` on each event-loop iteration until the scope is left or shielded), so
cleanup code that awaits (a rollback, a graceful close, a driver's cancel request) is
cancelled too, where ``asyncio.timeout`` cancels once. Each case runs on an engine of its
own whose pool holds one connection (``lab.one_connection``) and whose backend carries its
own ``application_name``; the variants of a scenario run at once, each with its own
engine. For each the experiment records what the cancelled code raised and what its
caller got, ``checkedout()`` right after and after a settle of ``settle`` seconds, the pool's
``invalidate`` events, the state of the connection's backend in ``pg_stat_activity``
(gone, idle, or still active), whether the next request reuses that backend, and the
warnings (garbage collection included, ``lab.capture``) and log records of
``sqlalchemy.pool``, ``psycopg`` and ``asyncpg``. The cases: a query (``pg_sleep``) cancelled
by a task group cancelled from outside (Starlette's shape), ``move_on_after``,
``fail_after`` and ``asyncio.timeout``; a session waiting in the pool for the connection
another session holds (``pool_pre_ping`` on); the pre-ping itself (made slow with a
``pg_sleep`` in ``do_ping``, a real round trip); ``AsyncSession.stream()`` and
``AsyncConnection.stream()`` cancelled between rows (a slow consumer) and while the
driver fetches a batch holding a slow row; and the close of a session busy with an open
stream, by an explicit ``await session.close()`` in a ``finally``, by ``async with``, and
by ``close()`` under ``anyio.CancelScope(shield=True)``. The last scenario waits, bounded,
for every invalidated backend to end.

Observed, the same on SQLAlchemy 2.0 and 2.1, PostgreSQL 18 (embedded) and 15:
inside the scope the cancellation is ``anyio.get_cancelled_exc_class()``, i.e.
``asyncio.CancelledError`` ("Cancelled via cancel scope …"); outside, a task group and
``move_on_after`` swallow it, ``fail_after`` raises ``TimeoutError``. No connection is
ever leaked: ``checkedout()`` is 0 right after every cancellation (1 only while another
session legitimately holds it), nothing reaches the garbage collector, nothing is logged
by ``sqlalchemy.pool``. A cancellation in the pool's queue takes nothing and loses
nothing; one in the pre-ping, in a query or in a driver's fetch costs the connection
(invalidated, ``CancelledError``) and returns its slot. Between rows of a stream the
session's or connection's ``async with`` still rolls back and returns the connection to
be reused (SQLAlchemy runs that close in a task of its own); an explicit ``await
session.close()`` in a cancelled scope is cancelled too and the connection is discarded
(not leaked); ``anyio.CancelScope(shield=True)`` around it keeps it. The server is where
the drivers differ: under ``asyncio.timeout`` both stop the cancelled query. Under anyio,
asyncpg never does: its cancel request is sent from a background task that asyncpg's
``terminate()`` cancels when SQLAlchemy, its graceful close cancelled again, terminates
the connection; the backend keeps running the query to its end (1.3 s after a 0.2 s
cancel of a 1.5 s ``pg_sleep``), its client gone and the pool not counting it. psycopg is
interrupted again while it sends its cancel request, logs "query cancellation
interrupted (CancelledError): closing connection" and closes the connection: over the
embedded server's unix socket the request had gone out and the query stops, over TCP
(the external server) it had not and the query runs on, as with asyncpg. Last, on
psycopg every stream left mid-way without its result closed (cancelled or not, ``async
with conn.stream()`` included, which closes its result only on a clean exit) leaves its
``AsyncServerCursor`` to the garbage collector, which warns (``ResourceWarning``);
closing the result under a shielded scope leaves none. asyncpg's ``fetchmany()`` on a
server-side cursor buffers 50 rows on its first fetch whatever ``yield_per`` says.

Sources: anyio docs, "Cancellation and timeouts" (cancel scopes, ``move_on_after``,
``fail_after``, shielding, ``get_cancelled_exc_class``) and its section "Differences
between asyncio and AnyIO cancellation semantics" (a cancelled scope keeps cancelling
every await inside it: confirmed, it is what each difference below comes from);
SQLAlchemy docs, "Asynchronous I/O (asyncio)" (``AsyncSession.stream``,
``AsyncConnection.stream``) and "Connection Pooling" - "More on Invalidation"; SQLAlchemy
changelog 2.0.38 (``asyncio.shield()`` added to the asyncpg terminate for anyio, #12077).
Issue threads, as observed here: sqlalchemy#12077 (an anyio task group cancelled while a
task holds a pooled asyncpg connection leaks it, idle on the server): not reproduced, no
backend is left idle and nothing stays checked out; the same root cause, cleanup awaits
cancelled again by anyio, is what leaves asyncpg's cancelled query running on the server.
sqlalchemy#11125 (a Starlette stream ended early: CancelledError "Cancelled by cancel
scope", the connection left open in PostgreSQL and not counted by the pool): not
reproduced as a leak; a bounded form of it is confirmed, a backend the pool no longer
counts that runs until its query ends (asyncpg, and psycopg over TCP). sqlalchemy#12099
and MagicStack/asyncpg#1211 (a cancelled ``direct_tls`` connection whose close fails with
"unexpected connection_lost() call" and leaks): not exercised, neither server here speaks
TLS; MagicStack/asyncpg#1156 (``terminate()`` in an anyio-cancelled stream leaves the
backend "idle in transaction"): not reproduced. psycopg source, ``AsyncConnection.wait``
(on a cancellation of a running query it sends ``cancel_safe`` and waits for the query to
end; interrupted again, it logs a warning and closes the connection, psycopg#1435): confirmed.
"""

from __future__ import annotations

import asyncio
import gc
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
from sqlalchemy import func, select, text
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncResult, AsyncSession, async_sessionmaker

from .lab import BadSizes, Lab, at_least, between, describe, experiment, matches, not_, on, probes
from .lab.capture import Captured, captured
from .lab.probes import checked_out

BOUND = 5.0
"""Upper bound (s) of every wait in this module: a hang becomes a failed check."""

TASK_GROUP = "anyio task group"
MOVE_ON = "anyio.move_on_after"
FAIL_AFTER = "anyio.fail_after"
SHIELDED = "anyio.CancelScope(shield=True)"
ASYNCIO = "asyncio.timeout"

GONE = "gone"
RUNNING = "still active"
IDLE = "idle"

SCOPE_CANCELLED = matches(r"^CancelledError: Cancelled via cancel scope [0-9a-f]+")
"""How anyio's cancellation reads inside the scope (asyncio.CancelledError, its message
naming the scope)."""
PSYCOPG_INTERRUPTED = "query cancellation interrupted (CancelledError): closing connection"
"""What psycopg logs when a second cancellation interrupts its cancel of a running query."""


@dataclass(frozen=True)
class Sizes:
    cancel_after: float = 0.2
    """Seconds before the cancel scope (or asyncio.timeout) fires."""
    long_sleep: float = 1.5
    """Seconds of the pg_sleep that is cancelled (a query, a slow pre-ping, a slow row)."""
    settle: float = 0.3
    """Seconds after the cancellation at which the pool and the server are looked at again."""
    rows: int = 30
    """Rows of the streamed query."""
    batch: int = 5
    """yield_per of the stream (the slow row is the first one after the first batch)."""
    row_pause: float = 0.02
    """Seconds the stream's consumer awaits after each row (a slow HTTP client)."""

    def __post_init__(self) -> None:
        if not 0 < self.cancel_after <= 1:
            raise BadSizes(f"cancel_after ({self.cancel_after:g} s) must be above 0 and at most 1")
        if self.settle <= 0:
            raise BadSizes(f"settle ({self.settle:g} s) must be above 0")
        if not self.cancel_after + self.settle + 0.3 <= self.long_sleep <= BOUND - 1:
            raise BadSizes(
                f"long_sleep ({self.long_sleep:g} s) must be at least cancel_after + settle + "
                f"0.3 s ({self.cancel_after + self.settle + 0.3:g} s), so that a query the "
                f"cancel did not stop is still running when it is looked at, and at most "
                f"{BOUND - 1:g} s"
            )
        if not 1 <= self.batch < self.rows - 1:
            raise BadSizes(f"batch ({self.batch}) must be at least 1 and below rows - 1")
        if self.row_pause <= 0 or self.rows * self.row_pause < 2 * self.cancel_after:
            raise BadSizes(
                f"rows * row_pause ({self.rows} * {self.row_pause:g} s) must be at least twice "
                f"cancel_after ({self.cancel_after:g} s): the stream must be mid-way when "
                "it is cancelled"
            )


run = experiment(15, "Cancellation by anyio cancel scopes (Starlette, FastAPI)", Sizes)


# ---------------------------------------------------------------- cancelling


@dataclass
class Cancelled:
    """What one cancellation looked like from inside and from outside the scope."""

    inside: str = "nothing"
    """What the cancelled code saw (``describe`` of what it raised)."""
    caller: str = "nothing"
    """What the code around the canceller got."""
    caught: bool | None = None
    """``move_on_after``'s ``cancelled_caught``."""
    is_cancelled_class: bool | None = None
    """Whether what the cancelled code saw is ``anyio.get_cancelled_exc_class()``."""
    seconds: float = 0.0
    """From the start until the caller resumed."""
    ended: float = 0.0
    """``time.perf_counter()`` when the caller resumed."""


def said(err: BaseException) -> str:
    return describe(err).rstrip(": ").rstrip()


async def cancel(how: str, body: Callable[[], Awaitable[None]], after: float) -> Cancelled:
    """Run ``body`` under ``how`` (a task group cancelled from outside after ``after``
    seconds, as Starlette cancels a handler; move_on_after; fail_after; asyncio.timeout)."""
    seen = Cancelled()

    async def guarded() -> None:
        try:
            await body()
        except BaseException as err:
            seen.inside = said(err)
            seen.is_cancelled_class = isinstance(err, anyio.get_cancelled_exc_class())
            raise

    started = time.perf_counter()
    try:
        if how == TASK_GROUP:
            async with anyio.create_task_group() as group:
                group.start_soon(guarded)
                await anyio.sleep(after)
                group.cancel_scope.cancel()
        elif how == MOVE_ON:
            with anyio.move_on_after(after) as scope:
                await guarded()
            seen.caught = scope.cancelled_caught
        elif how == FAIL_AFTER:
            with anyio.fail_after(after):
                await guarded()
        elif how == ASYNCIO:
            async with asyncio.timeout(after):
                await guarded()
        else:
            raise ValueError(f"no canceller {how!r}")
    except Exception as err:
        seen.caller = said(err)
    seen.ended = time.perf_counter()
    seen.seconds = seen.ended - started
    return seen


# ---------------------------------------------------------------- observing


async def backend_state(engine: AsyncEngine, pid: int) -> str:
    """``gone``, or the ``pg_stat_activity`` state of backend ``pid`` (``active``: still
    running the query, or, for psycopg's stream, the FETCH of its server-side cursor)."""
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text("SELECT state FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}
            )
        ).first()
    if row is None:
        return GONE
    state = str(row.state)
    return RUNNING if state == "active" else state


def transport(lab: Lab[Sizes]) -> str:
    """How the lab reaches its server: ``unix socket`` (the embedded server) or ``TCP``."""
    url = lab.db.target.url
    host = url.host or str(url.query.get("host") or "")
    return "unix socket" if not host or host.startswith("/") else "TCP"


def left_running(lab: Lab[Sizes], how: str) -> dict[str, str]:
    """The state expected of a backend whose query ``how`` cancelled, per driver: asyncpg
    leaves it running under any anyio scope; psycopg only over TCP (its cancel request,
    interrupted by the scope's next cancellation, gets out over a unix socket only)."""
    anyio_scope = how != ASYNCIO
    over_tcp = transport(lab) == "TCP"
    return {
        "asyncpg": RUNNING if anyio_scope else GONE,
        "psycopg": RUNNING if anyio_scope and over_tcp else GONE,
    }


def lingering(lab: Lab[Sizes], how: str, driver: str) -> int:
    """Backends of the case's app expected after the settle: the one left running, or none."""
    return 1 if left_running(lab, how)[driver] == RUNNING else 0


def expect_left_running(lab: Lab[Sizes], hows: list[str]) -> Any:
    """``on(asyncpg={how: state}, psycopg={how: state})`` for ``hows``."""
    states = {how: left_running(lab, how) for how in hows}
    return on(
        asyncpg={how: state["asyncpg"] for how, state in states.items()},
        psycopg={how: state["psycopg"] for how, state in states.items()},
    )


@dataclass
class Attempt:
    """The next request on the case's pool: ``ok`` or the error, and its backend."""

    result: str
    pid: int | None = None


async def next_request(sessions: async_sessionmaker[AsyncSession]) -> Attempt:
    try:
        async with asyncio.timeout(BOUND), sessions.begin() as session:
            pid = await probes.backend_pid(session)
    except Exception as err:
        return Attempt(said(err))
    return Attempt("ok", pid)


@dataclass
class Case:
    """One cancelled piece of work on an engine of its own (one pooled connection)."""

    label: str
    how: str
    app: str
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    pid: int
    """The backend of the pool's one connection before the cancellation."""
    invalidations: probes.Invalidations
    cancelled: Cancelled = field(default_factory=Cancelled)
    ran: list[int] = field(default_factory=list)
    """Samples of this app's backends running pg_sleep, until the caller resumed."""
    right_after: int = -1
    """checkedout() as soon as the caller resumed."""
    after_settle: int = -1
    victim: str = "?"
    """The state of backend ``pid`` after the settle."""
    backends: int = -1
    """This app's backends after the settle (probes.backends)."""
    next: Attempt = field(default_factory=lambda: Attempt("not run"))
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def kept(self) -> bool | None:
        """The next request ran on the same backend: the connection was returned and reused."""
        return None if self.next.pid is None else self.next.pid == self.pid

    def pool(self) -> dict[str, Any]:
        """What the pool did with the connection."""
        return {
            "pool invalidate events": self.invalidations.seen,
            "checked out right after": self.right_after,
            "checked out after the settle": self.after_settle,
            "next request": self.next.result,
            "next request on the same backend": self.kept,
        }


async def new_case(lab: Lab[Sizes], label: str, how: str, **engine: Any) -> Case:
    """An engine of one pooled connection, that connection opened; its backend's pid."""
    app = lab.name(label)
    options: dict[str, Any] = {"pool_pre_ping": False, "pool_timeout": BOUND, **engine}
    made = lab.one_connection(application_name=app, **options)
    sessions = lab.sessions_on(made)
    async with sessions() as session:
        pid = await probes.backend_pid(session)
    return Case(label, how, app, made, sessions, pid, probes.Invalidations.on(made))


async def cancel_case(
    lab: Lab[Sizes], case: Case, body: Callable[[], Awaitable[None]], *, sample: bool = False
) -> Case:
    """Cancel ``body`` as ``case.how`` says; then look at the pool and the server right away
    and after the settle, and make the next request."""
    size = lab.sizes
    sampler = (
        probes.sleepers_sampler(lab.engine, case.app, every=0.03, within=BOUND) if sample else None
    )
    try:
        case.cancelled = await cancel(case.how, body, size.cancel_after)
        case.right_after = checked_out(case.engine)
    finally:
        if sampler is not None:
            case.ran = await sampler.stop()
    await asyncio.sleep(max(0.0, case.cancelled.ended + size.settle - time.perf_counter()))
    case.after_settle = checked_out(case.engine)
    case.victim = await backend_state(lab.engine, case.pid)
    case.backends = await probes.backends(lab.engine, case.app)
    case.next = await next_request(case.sessions)
    if case.invalidations.seen:
        (await lab.use(invalidated)).append(Victim(case.label, case.pid))
    return case


@dataclass
class Victim:
    """A backend whose connection SQLAlchemy invalidated: it must end, soon."""

    label: str
    pid: int


@asynccontextmanager
async def invalidated(lab: Lab[Sizes]) -> AsyncIterator[list[Victim]]:
    """Every invalidated backend of the run; the last scenario waits for them to end."""
    yield []


ADDRESS = re.compile(r"0x[0-9a-f]+")

CURSOR_LEFT_OPEN = (
    "ResourceWarning: <psycopg.AsyncServerCursor object at 0x…> was deleted while still open. "
    "Please use 'with' or '.close()' to close the cursor properly"
)
"""psycopg's warning for a server-side cursor garbage-collected before it was closed."""


@dataclass
class Watched:
    """The warnings (garbage collection included) and log records of one scenario."""

    pool: Captured
    psycopg: Captured
    asyncpg: Captured

    def warnings(self) -> list[str]:
        """Every warning, object addresses left out, sorted."""
        boxes = (self.pool, self.psycopg, self.asyncpg)
        return sorted(ADDRESS.sub("0x…", line) for box in boxes for line in box.warning_lines())

    def pool_log(self) -> list[str]:
        return sorted(ADDRESS.sub("0x…", line) for line in self.pool.logged)

    def driver_log(self) -> list[str]:
        return sorted([*self.psycopg.logged, *self.asyncpg.logged])


@contextmanager
def watching() -> Iterator[Watched]:
    """Warnings, sqlalchemy.pool's records (WARNING and up) and the drivers' own (psycopg,
    asyncpg loggers), with a gc.collect() at the end."""
    with (
        captured() as pool,
        captured("psycopg", collect=False) as pg,
        captured("asyncpg", collect=False) as apg,
    ):
        yield Watched(pool, pg, apg)


def live_cursors() -> int:
    """psycopg ``AsyncServerCursor`` objects still alive (after a ``gc.collect()``): each
    would warn whenever it is collected, in whatever code runs then."""
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o).__name__ == "AsyncServerCursor")


def clean(watched: Watched) -> dict[str, list[str]]:
    return {"warnings (gc included)": watched.warnings(), "sqlalchemy.pool log": watched.pool_log()}


NO_NOISE: dict[str, list[str]] = {"warnings (gc included)": [], "sqlalchemy.pool log": []}


REPLACED: dict[str, Any] = {
    "pool invalidate events": ["CancelledError"],
    "checked out right after": 0,
    "checked out after the settle": 0,
    "next request": "ok",
    "next request on the same backend": False,
}
"""What a cancellation that cost the pool its connection leaves: the connection
invalidated, nothing checked out, the next request served by a new one."""


def per_how(cases: list[Case], pick: Callable[[Case], Any]) -> dict[str, Any]:
    """``pick(case)`` for each case, by its canceller."""
    return {case.how: pick(case) for case in cases}


def per_label(cases: list[Case], pick: Callable[[Case], Any]) -> dict[str, Any]:
    """``pick(case)`` for each case, by its label."""
    return {case.label: pick(case) for case in cases}


# ---------------------------------------------------------------- the scenarios


@run.scenario
async def cancelled_mid_query(lab: Lab[Sizes]) -> None:
    """A session runs a long pg_sleep on an engine of one connection; it is cancelled after
    cancel_after seconds by: an anyio task group cancelled from outside (what Starlette does
    to a handler when the client goes away), anyio.move_on_after, anyio.fail_after, and, to
    compare, asyncio.timeout: the four at once, each on its own engine."""
    await lab.use(invalidated)  # entered once, before the cases run at once
    size = lab.sizes

    async def one(how: str) -> Case:
        case = await new_case(lab, f"query-{slug(how)}", how)

        async def body() -> None:
            async with case.sessions() as session:
                await session.execute(select(func.pg_sleep(size.long_sleep)))

        return await cancel_case(lab, case, body, sample=True)

    with watching() as watched:
        cases = list(
            await asyncio.gather(*(one(how) for how in (TASK_GROUP, MOVE_ON, FAIL_AFTER, ASYNCIO)))
        )
    for case in cases:
        lab.figure(f"{case.how}: the caller resumed after", case.cancelled.seconds, "s")
    by = {case.how: case for case in cases}
    lab.check(
        "what each canceller raises",
        "Inside an anyio scope the cancelled await raises anyio.get_cancelled_exc_class(), "
        "which on asyncio is asyncio.CancelledError, its message naming the scope ('Cancelled "
        "via cancel scope …'). Outside: a task group and move_on_after swallow their own "
        "cancellation (move_on_after says so in cancelled_caught), fail_after turns it into "
        "TimeoutError, as asyncio.timeout does.",
        expected={
            "get_cancelled_exc_class()": "asyncio.exceptions.CancelledError",
            f"{TASK_GROUP}: inside": SCOPE_CANCELLED,
            f"{TASK_GROUP}: caller": "nothing",
            f"{MOVE_ON}: inside": SCOPE_CANCELLED,
            f"{MOVE_ON}: caller, cancelled_caught": ["nothing", True],
            f"{FAIL_AFTER}: inside": SCOPE_CANCELLED,
            f"{FAIL_AFTER}: caller": "TimeoutError",
            f"{ASYNCIO}: inside": "CancelledError",
            f"{ASYNCIO}: caller": "TimeoutError",
            "inside is get_cancelled_exc_class()": [True, True, True, True],
        },
        observed={
            "get_cancelled_exc_class()": qualified(anyio.get_cancelled_exc_class()),
            f"{TASK_GROUP}: inside": by[TASK_GROUP].cancelled.inside,
            f"{TASK_GROUP}: caller": by[TASK_GROUP].cancelled.caller,
            f"{MOVE_ON}: inside": by[MOVE_ON].cancelled.inside,
            f"{MOVE_ON}: caller, cancelled_caught": [
                by[MOVE_ON].cancelled.caller,
                by[MOVE_ON].cancelled.caught,
            ],
            f"{FAIL_AFTER}: inside": by[FAIL_AFTER].cancelled.inside,
            f"{FAIL_AFTER}: caller": by[FAIL_AFTER].cancelled.caller,
            f"{ASYNCIO}: inside": by[ASYNCIO].cancelled.inside,
            f"{ASYNCIO}: caller": by[ASYNCIO].cancelled.caller,
            "inside is get_cancelled_exc_class()": [c.cancelled.is_cancelled_class for c in cases],
        },
    )
    lab.check(
        "the connection is invalidated, none left checked out",
        "Whatever cancels it, a query cancelled mid-way costs the pool its connection: "
        "SQLAlchemy invalidates it (pool invalidate event CancelledError), nothing is checked "
        "out when the caller resumes or after the settle, and the next request gets a new "
        "backend. No connection is leaked to the garbage collector (sqlalchemy#12077's leak "
        "is not reproduced on this SQLAlchemy).",
        expected=per_how(
            cases,
            lambda c: REPLACED,
        ),
        observed=per_how(cases, Case.pool),
    )
    lab.check(
        "the query on the server: under anyio it may run on after the cancel",
        f"{size.settle:g} s after the cancellation, is the cancelled pg_sleep "
        f"({size.long_sleep:g} s) still running on its backend? Under asyncio.timeout "
        "neither driver leaves it: each sends "
        "PostgreSQL a cancel request. Under an anyio scope, which cancels every await again "
        "until the scope is left, the cancel request is itself cancelled. asyncpg sends it "
        "from a background task, and SQLAlchemy's graceful close is cancelled again at "
        "once, so SQLAlchemy terminates the connection, and asyncpg's terminate() cancels "
        "that pending request: the query runs on. psycopg sends it in the cancelled task, "
        "is interrupted again and closes the connection (see the driver log check): over "
        "the embedded server's unix socket the request was out before that, over TCP it "
        "was not and the query runs on. A backend left so runs its query to the end, its "
        "client gone (the last scenario waits for it).",
        expected=expect_left_running(lab, [TASK_GROUP, MOVE_ON, FAIL_AFTER, ASYNCIO]),
        observed=per_how(cases, lambda c: c.victim),
    )
    lab.check(
        "each query had started before the cancellation",
        "The probe saw each backend running the pg_sleep before the caller resumed (so a "
        "backend 'gone' above was cancelled, not never started); after the settle this "
        "app's backends are the one left running or none.",
        expected=on(
            asyncpg=per_how(cases, lambda c: [not_(0), lingering(lab, c.how, "asyncpg")]),
            psycopg=per_how(cases, lambda c: [not_(0), lingering(lab, c.how, "psycopg")]),
        ),
        observed=per_how(cases, lambda c: [probes.peak(c.ran), c.backends]),
    )
    lab.check(
        "no garbage-collector warning; psycopg's own log",
        "No warning (a garbage-collected connection included) and nothing logged by "
        "sqlalchemy.pool. psycopg logs, once per anyio cancellation, that its cancel was "
        "interrupted and it closed the connection; asyncio.timeout cancels once, so psycopg "
        "waits for the cancel and logs nothing; asyncpg logs nothing.",
        expected={
            **NO_NOISE,
            "driver log": on(asyncpg=[], psycopg=[PSYCOPG_INTERRUPTED] * 3),
        },
        observed={**clean(watched), "driver log": sorted(watched.driver_log())},
    )


def slug(how: str) -> str:
    return {TASK_GROUP: "group", MOVE_ON: "moveon", FAIL_AFTER: "failafter", ASYNCIO: "asyncio"}[
        how
    ]


def qualified(kind: type[BaseException]) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


@run.scenario
async def cancelled_waiting_for_checkout(lab: Lab[Sizes]) -> None:
    """An engine of one connection (pool_pre_ping on) whose connection another session holds:
    a second session waits for it in the pool and is cancelled there (move_on_after, and
    asyncio.timeout to compare); the holder returns the connection a moment later."""
    await lab.use(invalidated)  # entered once, before the cases run at once
    size = lab.sizes

    async def one(how: str) -> Case:
        case = await new_case(lab, f"checkout-{slug(how)}", how, pool_pre_ping=True)
        holder = case.sessions()
        await probes.backend_pid(holder)  # the pool's one connection, checked out
        case.extra["checked out while the holder holds it"] = checked_out(case.engine)

        async def release() -> None:
            await asyncio.sleep(size.cancel_after + size.settle / 2)
            await holder.close()

        releasing = asyncio.create_task(release())

        async def body() -> None:
            async with case.sessions() as session:
                await session.execute(select(1))

        try:
            return await cancel_case(lab, case, body)
        finally:
            await releasing

    with watching() as watched:
        cases = list(await asyncio.gather(*(one(how) for how in (MOVE_ON, ASYNCIO))))
    by = {case.how: case for case in cases}
    lab.check(
        "cancelled in the pool's queue: the exception",
        "The session waiting for a connection is cancelled at cancel_after (well before "
        "pool_timeout): anyio's CancelledError inside, nothing outside move_on_after; "
        "TimeoutError from asyncio.timeout.",
        expected={
            f"{MOVE_ON}: inside": SCOPE_CANCELLED,
            f"{MOVE_ON}: caller, cancelled_caught": ["nothing", True],
            f"{ASYNCIO}: caller": "TimeoutError",
            "caller resumed after (s)": [
                between(size.cancel_after, size.cancel_after + 0.5),
                between(size.cancel_after, size.cancel_after + 0.5),
            ],
        },
        observed={
            f"{MOVE_ON}: inside": by[MOVE_ON].cancelled.inside,
            f"{MOVE_ON}: caller, cancelled_caught": [
                by[MOVE_ON].cancelled.caller,
                by[MOVE_ON].cancelled.caught,
            ],
            f"{ASYNCIO}: caller": by[ASYNCIO].cancelled.caller,
            "caller resumed after (s)": [c.cancelled.seconds for c in cases],
        },
    )
    lab.check(
        "cancelled in the pool's queue: nothing taken, nothing lost",
        "The cancelled waiter takes nothing from the pool: right after, the only connection "
        "checked out is the holder's; once the holder closes its session, none; the "
        "connection is not invalidated, its backend stays idle, and the next request reuses "
        "it (pre-ping and all).",
        expected=per_how(
            cases,
            lambda c: {
                "checked out while the holder holds it": 1,
                "pool invalidate events": [],
                "checked out right after": 1,
                "checked out after the settle": 0,
                "backend after the settle": IDLE,
                "next request": "ok",
                "next request on the same backend": True,
            },
        ),
        observed=per_how(
            cases,
            lambda c: {
                "checked out while the holder holds it": c.extra[
                    "checked out while the holder holds it"
                ],
                **c.pool(),
                "backend after the settle": c.victim,
            },
        ),
    )
    lab.check(
        "cancelled in the pool's queue: no warning",
        "No warning, no pool log record, no driver log record.",
        expected={**NO_NOISE, "driver log": []},
        observed={**clean(watched), "driver log": watched.driver_log()},
    )


@contextmanager
def slow_pre_ping(engine: AsyncEngine, seconds: float) -> Iterator[None]:
    """The engine's pre-ping first runs ``SELECT pg_sleep(seconds)`` on the connection: a
    ping that takes that long (a slow network or server), made of a real round trip."""
    dialect: Dialect = engine.sync_engine.dialect
    ping = dialect.do_ping

    def slow(dbapi_connection: Any) -> bool:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"SELECT pg_sleep({float(seconds)})")
        finally:
            cursor.close()
        return ping(dbapi_connection)

    dialect.do_ping = slow  # type: ignore[method-assign]
    try:
        yield
    finally:
        dialect.do_ping = ping  # type: ignore[method-assign]


@run.scenario
async def cancelled_during_pre_ping(lab: Lab[Sizes]) -> None:
    """An engine of one connection with pool_pre_ping, whose ping is made slow (it runs a
    pg_sleep first); a session checks out the idle connection and is cancelled while the
    pre-ping runs (move_on_after, and asyncio.timeout to compare)."""
    await lab.use(invalidated)  # entered once, before the cases run at once
    size = lab.sizes

    async def one(how: str) -> Case:
        case = await new_case(lab, f"ping-{slug(how)}", how, pool_pre_ping=True)

        async def body() -> None:
            async with case.sessions() as session:
                await session.execute(select(1))

        with slow_pre_ping(case.engine, size.long_sleep):
            return await cancel_case(lab, case, body, sample=True)

    with watching() as watched:
        cases = list(await asyncio.gather(*(one(how) for how in (MOVE_ON, ASYNCIO))))
    by = {case.how: case for case in cases}
    lab.check(
        "cancelled in the pre-ping: the exception",
        "The checkout's ping is cancelled: anyio's CancelledError inside (nothing outside "
        "move_on_after), TimeoutError from asyncio.timeout; the probe saw the ping's "
        "pg_sleep running before.",
        expected={
            f"{MOVE_ON}: inside": SCOPE_CANCELLED,
            f"{MOVE_ON}: caller": "nothing",
            f"{ASYNCIO}: caller": "TimeoutError",
            "ping seen running": [not_(0), not_(0)],
        },
        observed={
            f"{MOVE_ON}: inside": by[MOVE_ON].cancelled.inside,
            f"{MOVE_ON}: caller": by[MOVE_ON].cancelled.caller,
            f"{ASYNCIO}: caller": by[ASYNCIO].cancelled.caller,
            "ping seen running": [probes.peak(c.ran) for c in cases],
        },
    )
    lab.check(
        "cancelled in the pre-ping: the slot is returned",
        "A cancellation inside the pre-ping (before any session owns the connection) "
        "invalidates the connection and returns its slot: nothing is checked out right after "
        "or after the settle, and the next checkout opens a new connection.",
        expected=per_how(
            cases,
            lambda c: REPLACED,
        ),
        observed=per_how(cases, Case.pool),
    )
    lab.check(
        "cancelled in the pre-ping: the ping's query on the server",
        "As for a query: under asyncio.timeout both drivers cancel the ping's pg_sleep; "
        "under anyio asyncpg leaves it running on the server after the connection is "
        "terminated, and psycopg does too over TCP (not over a unix socket).",
        expected=expect_left_running(lab, [MOVE_ON, ASYNCIO]),
        observed=per_how(cases, lambda c: c.victim),
    )
    lab.check(
        "cancelled in the pre-ping: no garbage-collector warning",
        "No warning and nothing logged by sqlalchemy.pool; psycopg logs its interrupted "
        "cancel once (the anyio case).",
        expected={**NO_NOISE, "driver log": on(asyncpg=[], psycopg=[PSYCOPG_INTERRUPTED])},
        observed={**clean(watched), "driver log": watched.driver_log()},
    )


SESSION = "await session.stream()"
SESSION_CLOSED = "await session.stream(), result closed in a shielded finally"
CONNECTION = "await conn.stream()"
CONNECTION_CM = "async with conn.stream()"


@run.scenario
async def cancelled_mid_stream(lab: Lab[Sizes]) -> None:
    """AsyncSession.stream() and AsyncConnection.stream() (yield_per = batch), inside the
    session's or connection's async with, cancelled by move_on_after: while the consumer
    awaits between rows (a slow client), the connection's stream also as async with
    conn.stream(); and while the driver waits for a batch holding a slow row (a pg_sleep),
    the session's stream also under asyncio.timeout."""
    await lab.use(invalidated)  # entered once, before the cases run at once
    size = lab.sizes
    between_rows = text(f"SELECT g FROM generate_series(1, {size.rows}) AS g")
    slow = size.batch + 1
    slow_batch = text(
        f"SELECT g, pg_sleep(CASE WHEN g = {slow} THEN {float(size.long_sleep)} ELSE 0 END) "
        f"FROM generate_series(1, {size.rows}) AS g"
    )
    options = {"yield_per": size.batch}

    async def one(label: str, how: str, streamed: str, query: Any, pause: float) -> Case:
        case = await new_case(lab, label, how)
        case.extra["rows"] = 0

        async def consume(result: AsyncResult[Any]) -> None:
            async for _ in result:
                case.extra["rows"] += 1
                if pause:
                    await anyio.sleep(pause)

        async def body() -> None:
            if streamed == SESSION:
                async with case.sessions() as session:
                    await consume(await session.stream(query, execution_options=options))
            elif streamed == SESSION_CLOSED:
                async with case.sessions() as session:
                    result = await session.stream(query, execution_options=options)
                    try:
                        await consume(result)
                    finally:
                        with anyio.CancelScope(shield=True):
                            await result.close()
            elif streamed == CONNECTION:
                async with case.engine.connect() as conn:
                    await consume(await conn.stream(query, execution_options=options))
            else:
                async with (
                    case.engine.connect() as conn,
                    conn.stream(query, execution_options=options) as result,
                ):
                    await consume(result)

        return await cancel_case(lab, case, body, sample=True)

    variants = [
        ("rows: session.stream", MOVE_ON, SESSION, between_rows, size.row_pause),
        ("rows: conn.stream", MOVE_ON, CONNECTION, between_rows, size.row_pause),
        ("rows: async with conn.stream", MOVE_ON, CONNECTION_CM, between_rows, size.row_pause),
        ("rows: session.stream, closed", MOVE_ON, SESSION_CLOSED, between_rows, size.row_pause),
        ("batch: session.stream", MOVE_ON, SESSION, slow_batch, 0.0),
        ("batch: conn.stream", MOVE_ON, CONNECTION, slow_batch, 0.0),
        ("batch: session.stream, asyncio", ASYNCIO, SESSION, slow_batch, 0.0),
    ]
    with watching() as watched:
        cases = list(await asyncio.gather(*(one(*v) for v in variants)))
    rows_cases, batch_cases = cases[:4], cases[4:]
    lab.check(
        "cancelled between rows: the connection goes back to the pool",
        "Cancelled while the consumer awaits between rows (the stream's cursor open, the "
        "transaction idle on the server), the session's or connection's async with closes "
        "it to the end although the scope keeps cancelling (SQLAlchemy runs that close in a "
        "task of its own and waits for it): the connection is rolled back and returned, not "
        "invalidated, its backend idle, and the next request reuses it. sqlalchemy#11125 "
        "(a Starlette stream ended early leaves the connection open, not counted by the "
        "pool) is not reproduced on this SQLAlchemy.",
        expected=per_label(
            rows_cases,
            lambda c: {
                "caller": "nothing",
                "rows before the cancel": between(1, size.rows - 1),
                "pool invalidate events": [],
                "checked out right after": 0,
                "checked out after the settle": 0,
                "backend after the settle": IDLE,
                "next request": "ok",
                "next request on the same backend": True,
            },
        ),
        observed=per_label(
            rows_cases,
            lambda c: {
                "caller": c.cancelled.caller,
                "rows before the cancel": c.extra["rows"],
                **c.pool(),
                "backend after the settle": c.victim,
            },
        ),
    )
    lab.check(
        "cancelled while the driver fetches a batch: invalidated, the query may run on",
        "Cancelled while the driver waits for the server (the slow row), the connection is "
        "invalidated and its slot returned; on the server it is the mid-query case again: "
        "under asyncio.timeout both drivers cancel the query; under anyio asyncpg leaves it "
        "running, and psycopg does too over TCP (its backend is then active in the FETCH "
        "of its named cursor). The rows received before the "
        "cancel tell where each driver waited: SQLAlchemy's buffered result fetches one "
        "row at execute, then a batch; its asyncpg server-side cursor fills its buffer "
        "with 50 rows on that first fetch whatever yield_per says, so asyncpg had "
        "delivered none, psycopg (whose first FETCH asked for one row) one.",
        expected=per_label(
            batch_cases,
            lambda c: {
                "rows before the cancel": on(asyncpg=0, psycopg=1),
                **REPLACED,
                "backend after the settle": on(**left_running(lab, c.how)),
            },
        ),
        observed=per_label(
            batch_cases,
            lambda c: {
                "rows before the cancel": c.extra["rows"],
                **c.pool(),
                "backend after the settle": c.victim,
            },
        ),
    )
    abandoned = sum(1 for c in cases if c.label != "rows: session.stream, closed")
    lab.check(
        "cancelled mid-stream: psycopg's abandoned cursors warn at garbage collection",
        "Nothing is logged by sqlalchemy.pool and no connection reaches the garbage "
        "collector. But a psycopg stream left mid-way without its result closed leaves "
        "psycopg's AsyncServerCursor to the garbage collector, which warns (ResourceWarning: "
        f"deleted while still open): one per such stream here ({abandoned}), cancelled by "
        "anyio or by asyncio alike, async with conn.stream() included (it closes its result "
        "only when the block ends without an exception). Closing the result in a finally "
        "under anyio.CancelScope(shield=True) leaves none. asyncpg's cursor does not warn. "
        "No cursor is left alive after the scenario's gc.collect() (none warns later). "
        "psycopg also logs its interrupted cancel for each slow batch cancelled by anyio "
        "(two).",
        expected={
            "warnings (gc included)": on(asyncpg=[], psycopg=[CURSOR_LEFT_OPEN] * abandoned),
            "sqlalchemy.pool log": [],
            "server cursors still alive": 0,
            "driver log": on(asyncpg=[], psycopg=[PSYCOPG_INTERRUPTED] * 2),
        },
        observed={
            **clean(watched),
            "server cursors still alive": live_cursors(),
            "driver log": watched.driver_log(),
        },
    )


@run.scenario
async def cancelled_at_close(lab: Lab[Sizes]) -> None:
    """A session streams rows (its connection busy with an open server-side cursor and
    transaction) and is cancelled between rows by move_on_after; then it is closed: by an
    explicit await session.close() in a finally, by its async with, by session.close()
    inside anyio.CancelScope(shield=True); and, to compare, an explicit close under
    asyncio.timeout."""
    await lab.use(invalidated)  # entered once, before the cases run at once
    size = lab.sizes
    query = text(f"SELECT g FROM generate_series(1, {size.rows}) AS g")
    options = {"yield_per": size.batch}

    async def one(label: str, how: str, closing: str) -> Case:
        case = await new_case(lab, label, how)
        case.extra["close()"] = "in async with"

        async def consume(session: AsyncSession) -> None:
            async for _ in await session.stream(query, execution_options=options):
                await anyio.sleep(size.row_pause)

        async def close(session: AsyncSession) -> None:
            try:
                if closing == SHIELDED:
                    with anyio.CancelScope(shield=True):
                        await session.close()
                else:
                    await session.close()
            except BaseException as err:
                case.extra["close()"] = said(err)
                raise
            case.extra["close()"] = "ok"

        async def body() -> None:
            if closing == "async with":
                async with case.sessions() as session:
                    await consume(session)
                return
            session = case.sessions()
            try:
                await consume(session)
            finally:
                await close(session)

        return await cancel_case(lab, case, body)

    variants = [
        ("close-explicit", MOVE_ON, "explicit"),
        ("close-asyncwith", MOVE_ON, "async with"),
        ("close-shielded", MOVE_ON, SHIELDED),
        ("close-explicit-asyncio", ASYNCIO, "explicit"),
    ]
    with watching() as watched:
        cases = list(await asyncio.gather(*(one(*v) for v in variants)))
    explicit, *kept = cases
    lab.check(
        "an explicit close() in a cancelled scope: cancelled too, the connection discarded",
        "In a finally under a cancelled anyio scope, await session.close() is cancelled "
        "again (anyio cancels every await until the scope is left): close() raises "
        "CancelledError, and SQLAlchemy, interrupted while resetting the connection, "
        "invalidates it rather than return it mid-way. Nothing is leaked (checked out 0, the "
        "backend gone), but the pool has lost its connection and the next request opens "
        "a new one.",
        expected={
            "close()": SCOPE_CANCELLED,
            **REPLACED,
            "backend after the settle": GONE,
        },
        observed={
            "close()": explicit.extra["close()"],
            **explicit.pool(),
            "backend after the settle": explicit.victim,
        },
    )
    lab.check(
        "async with, a shielded close(), or asyncio: the connection is kept",
        "Closed by the session's async with (SQLAlchemy runs that close in a task of its own "
        "and waits for it), or by close() inside anyio.CancelScope(shield=True), the "
        "connection is rolled back and returned; asyncio.timeout cancels only once, so an "
        "explicit close() in the finally runs normally. Not invalidated, its backend idle, "
        "the next request reuses it.",
        expected=per_label(
            kept,
            lambda c: {
                "close()": "in async with" if c.label == "close-asyncwith" else "ok",
                "pool invalidate events": [],
                "checked out right after": 0,
                "checked out after the settle": 0,
                "backend after the settle": IDLE,
                "next request": "ok",
                "next request on the same backend": True,
            },
        ),
        observed=per_label(
            kept,
            lambda c: {
                "close()": c.extra["close()"],
                **c.pool(),
                "backend after the settle": c.victim,
            },
        ),
    )
    lab.check(
        "cancelled at close: no connection for the garbage collector",
        "Nothing logged by sqlalchemy.pool, no connection reaches the garbage collector; on "
        "psycopg each of the streams, left without closing its result, leaves its server "
        "cursor to it (a ResourceWarning each, as in the previous scenario). psycopg, whose "
        "close of the stream's cursor is what the second cancellation of the explicit "
        "close() interrupts, logs its interrupted cancel once.",
        expected={
            "warnings (gc included)": on(asyncpg=[], psycopg=[CURSOR_LEFT_OPEN] * len(cases)),
            "sqlalchemy.pool log": [],
            "server cursors still alive": 0,
            "driver log": on(asyncpg=[], psycopg=[PSYCOPG_INTERRUPTED]),
        },
        observed={
            **clean(watched),
            "server cursors still alive": live_cursors(),
            "driver log": watched.driver_log(),
        },
    )


@run.scenario
async def no_backend_outlives_its_query(lab: Lab[Sizes]) -> None:
    """Wait (bounded) until every backend whose connection was invalidated above has ended,
    and note how long each outlived its cancellation."""
    victims = await lab.use(invalidated)
    if not victims:
        lab.skip("no scenario before this one invalidated a connection")
    gone = await probes.poll(
        lambda: probes.live_pids(lab.engine, [v.pid for v in victims]),
        lambda alive: not alive,
        within=lab.sizes.long_sleep + BOUND,
    )
    lab.figure("waited for the invalidated backends to end", gone.seconds, "s")
    alive = set(gone.value)
    lab.check(
        "every invalidated backend ends within the bound",
        f"Every backend whose connection was invalidated above has left pg_stat_activity "
        f"within long_sleep + {BOUND:g} s: the ones asyncpg left running end with their "
        "query; none stays behind, idle and unseen by any pool.",
        expected={"invalidated backends": at_least(1), "still alive": []},
        observed={
            "invalidated backends": len(victims),
            "still alive": sorted(v.label for v in victims if v.pid in alive),
        },
    )
