"""What happens when concurrent tasks share one AsyncSession (concurrent reads, and the
session closed by `async with` while a task still uses it), how much does one session
per task gain with N parallel pg_sleep calls, and how does async_scoped_session scoped
to the current task hand out and keep sessions?

One ``AsyncSession`` is one transaction on at most one connection: what
happens when several asyncio tasks share it (concurrent reads; the session
closed by ``async with`` while a task still uses it), how much one session
per task buys in wall time, and how ``async_scoped_session`` keyed on
``asyncio.current_task`` hands out and keeps sessions.

Every misuse runs on its own small engine (``lab.one_connection``, or
``lab.engine_with`` for a bigger pool) whose connections carry their own
``application_name``, so ``pg_stat_activity`` shows exactly what the misuse
left behind and nothing reaches the shared pool.

Sources:

- SQLAlchemy docs, "Asynchronous I/O (asyncio)", "Using AsyncSession with
  Concurrent Tasks": a single ``AsyncSession`` is not safe for use in
  concurrent tasks; with ``asyncio.gather()`` use a separate session per task.
- Same page, "Using asyncio scoped session": ``scopefunc=current_task``;
  ``async_scoped_session.remove()`` must be awaited at the end of each task, or
  the task and its session stay in the registry (a memory leak); the pattern
  is not recommended for new code.
- sqlalchemy/sqlalchemy#9973 "Improve session state change detection" and
  #7433 "concurrency / reentrant checks for session": the state guards behind
  ``IllegalStateChangeError`` and "This session is provisioning a new
  connection; concurrent operations are not permitted".
- sqlalchemy/sqlalchemy#10092: ``gather()`` raises on the first failing task
  while the others still run; the ``async with`` then closes sessions still in
  use (maintainer advice: ``return_exceptions=True``).
- sqlalchemy/sqlalchemy#5967 and MagicStack/asyncpg#863: asyncpg's
  "cannot perform operation: another operation is in progress".
- sqlalchemy/sqlalchemy#8340: the ``current_task`` scoped-session example keeps
  every task in the registry unless ``remove()`` is called.
- The asyncpg dialect source (``sqlalchemy/dialects/postgresql/asyncpg.py``):
  each cursor execute runs under a per-connection ``asyncio.Lock``
  (``_execute_mutex``); ``rollback()``/``commit()`` do not take it. That is why
  concurrent reads on a session that holds a connection queue up, while a
  close (rollback) during a running query fails in asyncpg itself.
- The psycopg dialect source (``sqlalchemy/dialects/postgresql/psycopg.py``,
  "override to not use mutex, psycopg3 already has mutex") and psycopg's
  ``AsyncConnection``: every ``execute()``, ``commit()`` and ``rollback()`` runs
  under the connection's own ``self.lock``. So with psycopg the reads queue up
  too, and a close during a running query waits for the query, then rolls back
  and returns the connection: nothing leaks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_scoped_session

from .lab import (
    BadSizes,
    Lab,
    at_least,
    capture,
    contains,
    describe,
    each,
    experiment,
    matches,
    more_than,
    on,
    one_transaction,
    outcome,
    prefix,
    probes,
)


@dataclass(frozen=True)
class Sizes:
    tasks: int = 5
    """Concurrent tasks (reads on one session, one session each, scoped sessions)."""
    sleep: float = 0.2
    """Seconds each task's pg_sleep read lasts (shared reads, one session per task)."""
    race_sleep: float = 0.25
    """Seconds the task's pg_sleep lasts while the block closes its session."""

    def __post_init__(self) -> None:
        if self.tasks < 2:
            raise BadSizes(f"tasks ({self.tasks}) must be at least 2: nothing to share with one")
        if self.sleep <= 0 or self.race_sleep <= 0:
            raise BadSizes(
                f"sleep ({self.sleep}) and race_sleep ({self.race_sleep}) must be positive: "
                "the server must see the queries run"
            )


run = experiment(4, "Sessions and tasks", Sizes)

POOL_TIMEOUT = 0.1  # seconds a checkout waits on the misuse engines: bounds "next use"
WAIT_BOUND = 10.0  # upper bound for any wait on the server or on a task
SAMPLE_EVERY = 0.005  # seconds between two samples of pg_stat_activity


async def sleep_in(session: AsyncSession, seconds: float) -> int:
    """``SELECT pg_backend_pid() FROM pg_sleep(:s)``: sleeps, then says which backend ran it."""
    pid = await session.scalar(select(func.pg_backend_pid()).select_from(func.pg_sleep(seconds)))
    return int(pid or 0)


@dataclass
class Gathered:
    """What :func:`gather_sleeps` saw."""

    results: list[int | BaseException]
    wall: float
    samples: list[int]
    """``app``'s backends in pg_sleep, sampled all along the gather."""

    @property
    def outcomes(self) -> list[str]:
        return ["ok" if isinstance(r, int) else describe(r) for r in self.results]

    @property
    def pids(self) -> set[int]:
        return {r for r in self.results if isinstance(r, int)}

    @property
    def most_at_once(self) -> int:
        return probes.peak(self.samples)

    @property
    def samples_in_sleep(self) -> int:
        """Samples that saw at least one pg_sleep: the sampler did watch the sleeps."""
        return sum(n > 0 for n in self.samples)


async def gather_sleeps(lab: Lab[Sizes], app: str, sleeps: Iterable[Awaitable[int]]) -> Gathered:
    """Gather ``sleeps`` (bounded, exceptions returned) while sampling how many of
    ``app``'s backends are in pg_sleep at the same moment."""
    async with probes.sleepers_sampler(
        lab.engine, app, every=SAMPLE_EVERY, within=WAIT_BOUND
    ) as seen:
        started = time.perf_counter()
        async with asyncio.timeout(WAIT_BOUND):
            results = await asyncio.gather(*sleeps, return_exceptions=True)
        wall = time.perf_counter() - started
    return Gathered(list(results), wall, seen.samples)


# --- one session, N concurrent reads ------------------------------------------------------


@run.scenario
async def concurrent_reads_on_one_session(lab: Lab[Sizes]) -> None:
    """N tasks gather a pg_sleep read on ONE session, first a fresh one, then one that
    already holds its connection, each on its own engine with room for N connections;
    then two more transactions on each engine."""
    tasks, sleep = lab.sizes.tasks, lab.sizes.sleep
    found: dict[str, Gathered] = {}
    next_use: dict[str, list[str]] = {}
    for variant in ("fresh", "holding"):
        app = lab.name(f"reads-{variant}")
        # room for `tasks` connections: if the session could fan out, it would
        engine = lab.engine_with(
            pool_size=tasks, max_overflow=0, pool_timeout=POOL_TIMEOUT, application_name=app
        )
        sessions = lab.sessions_on(engine)
        async with sessions() as session:
            if variant == "holding":
                await session.execute(select(1))
            found[variant] = await gather_sleeps(
                lab, app, (sleep_in(session, sleep) for _ in range(tasks))
            )
        next_use[variant] = [await outcome(one_transaction(sessions)) for _ in range(2)]
        await engine.dispose()

    fresh, holding = found["fresh"], found["holding"]
    refused = [r for r in fresh.outcomes if r != "ok"]
    lab.check(
        "shared fresh session: one read runs, the others are refused",
        f"{tasks} tasks gather session.execute(SELECT pg_sleep) on ONE session that has no "
        "connection yet: the first task starts provisioning the connection, every other task "
        "is refused at once by SQLAlchemy's session state guard.",
        expected={
            "ok": 1,
            "refused": tasks - 1,
            "refused with": each(matches(r"^InvalidRequestError: .*provisioning a new connection")),
        },
        observed={
            "ok": fresh.outcomes.count("ok"),
            "refused": len(refused),
            "refused with": sorted(set(refused)),
        },
    )
    lab.check(
        "shared session holding a connection: reads are queued, not refused",
        f"The same {tasks} reads on a session that already holds its connection all succeed: "
        "both drivers queue them on that one connection (asyncpg under the dialect's "
        "per-connection _execute_mutex, psycopg under its AsyncConnection's own lock): one "
        "backend, never two pg_sleep at once, although the pool had room for more: "
        "serialised, not parallel.",
        expected={
            "reads": ["ok"] * tasks,
            "backends": 1,
            "most in pg_sleep at once": 1,
            "samples that saw a pg_sleep": at_least(tasks),
        },
        observed={
            "reads": holding.outcomes,
            "backends": len(holding.pids),
            "most in pg_sleep at once": holding.most_at_once,
            "samples that saw a pg_sleep": holding.samples_in_sleep,
        },
    )
    lab.check(
        "concurrent reads leave the pool healthy",
        "Unlike the shared-session writes of experiment 1, these concurrent reads leave no "
        "broken connection behind: the next two transactions on each engine work.",
        expected={"fresh": ["ok", "ok"], "holding": ["ok", "ok"]},
        observed=next_use,
    )
    lab.figure(f"{tasks} reads shared on one session holding a connection", holding.wall, "s")
    lab.figure("shared-session reads: wall time / one sleep", holding.wall / sleep, "x")
    lab.figure("samples of pg_stat_activity (holding)", len(holding.samples))


# --- the session closed while a task still uses it ----------------------------------------


SHOWN = {
    "close": "block",
    "leaves the block": "block",
    "its __context__": "context",
    "task still running after the close": "running_after_close",
    "task": "task",
    "checked out": "checked_out_after_task",
    "idle in transaction": "idle_in_transaction",
    "second close": "second_close",
    "checked out after the second close": "checked_out_after_second_close",
    "next use": "next_use",
}
"""The race's observations by the name a check gives them."""


@dataclass
class Race:
    block: str = "no error"  # what `async with sessions() as session:` raised
    context: str = "none"  # that exception's __context__ (what it replaced)
    task: str = "?"
    running_after_close: bool = False  # the task, once the block has closed the session
    checked_out_after_task: int = -1
    idle_in_transaction: int = -1
    second_close: str = "?"
    checked_out_after_second_close: int = -1
    next_use: str = "?"
    gathered: list[str] = field(default_factory=list)
    # after the race's objects are dropped and collected
    collected: capture.Captured = field(default_factory=capture.Captured)
    checked_out_after_gc: int = -1
    pid: int = 0  # the task's backend
    backend_gone: bool = False  # that backend has left pg_stat_activity
    next_use_after_gc: str = "?"

    def observed(self, expected: dict[str, Any]) -> dict[str, Any]:
        """What the race shows under each key of ``expected`` (see :data:`SHOWN`)."""
        return {key: getattr(self, SHOWN[key]) for key in expected}

    @property
    def warnings(self) -> str:
        return "; ".join(self.collected.warning_lines(" <")) or "no warning"


async def fail_when_sleeping(lab: Lab[Sizes], app: str) -> None:
    await probes.wait_sleepers(
        lab.engine, app, lambda n: n > 0, within=WAIT_BOUND, every=SAMPLE_EVERY
    )
    raise RuntimeError("another task failed")


async def race(lab: Lab[Sizes], engine: AsyncEngine, app: str, variant: str) -> Race:
    """Leave ``async with sessions() as session:`` while a task still uses ``session``."""
    sessions = lab.sessions_on(engine)
    found = Race()
    job: asyncio.Task[int] | None = None
    try:
        async with sessions() as session:
            job = asyncio.create_task(sleep_in(session, lab.sizes.race_sleep))
            if variant == "connecting":
                await asyncio.sleep(0)  # the task has started to check out a connection
            elif variant == "query":
                await probes.wait_sleepers(
                    lab.engine, app, lambda n: n > 0, within=WAIT_BOUND, every=SAMPLE_EVERY
                )
            elif variant == "gather":
                await asyncio.gather(job, fail_when_sleeping(lab, app))
            else:  # "gather, return_exceptions"
                results = await asyncio.gather(
                    job, fail_when_sleeping(lab, app), return_exceptions=True
                )
                found.gathered = [
                    describe(r) if isinstance(r, BaseException) else "ok" for r in results
                ]
    except Exception as exc:
        found.block = describe(exc)
        found.context = describe(exc.__context__) if exc.__context__ is not None else "none"
    assert job is not None
    found.running_after_close = not job.done()
    try:
        found.pid = await asyncio.wait_for(job, WAIT_BOUND)
        found.task = "ok"
    except Exception as exc:
        found.task = describe(exc)
    found.checked_out_after_task = probes.checked_out(engine)
    found.idle_in_transaction = await probes.backends(lab.engine, app, state="idle in transaction")
    found.second_close = await outcome(session.close())
    found.checked_out_after_second_close = probes.checked_out(engine)
    found.next_use = await outcome(one_transaction(sessions))  # bounded by POOL_TIMEOUT
    return found


async def race_on_its_own_engine(lab: Lab[Sizes], variant: str, slug: str) -> Race:
    """:func:`race` on a one-connection engine of its own (``application_name`` =
    ``<tag>race-<slug>``), then garbage collection and one more transaction there."""
    app = lab.name(f"race-{slug}")
    engine = lab.one_connection(pool_timeout=POOL_TIMEOUT, application_name=app)
    with capture.captured() as collected, capture.manual_gc():
        # only the collect at the end of captured() may reclaim a leaked connection
        result = await race(lab, engine, app, variant)
    result.collected = collected
    result.checked_out_after_gc = probes.checked_out(engine)
    if result.checked_out_after_second_close:  # leaked until collected
        # a terminated backend leaves pg_stat_activity a moment later
        result.backend_gone = await backend_gone(lab, app, result.pid, within=2.0)
    else:  # returned to the pool (psycopg): is its backend still open there?
        result.backend_gone = result.pid not in await probes.backend_pids(lab.engine, app)
    result.next_use_after_gc = await outcome(one_transaction(lab.sessions_on(engine)))
    await engine.dispose()
    return result


async def backend_gone(lab: Lab[Sizes], app: str, pid: int, *, within: float) -> bool:
    """Wait (bounded) until backend ``pid`` is no longer among ``app``'s connections."""
    found = await probes.poll(
        lambda: probes.backend_pids(lab.engine, app),
        lambda pids: pid not in pids,
        within=within,
        every=SAMPLE_EVERY,
    )
    return found.held


def check_collected(lab: Lab[Sizes], leaked: Race) -> None:
    """The garbage collector's part of a leak (the same check for every leaking race)."""
    lab.check(
        "what the garbage collector finds of the connection",
        "asyncpg: once the leaked session and task are dropped, garbage collection finds the "
        "connection still checked out: the pool warns (SAWarning), logs an error, and "
        "terminates it; the pool is then empty and usable again with a new connection. "
        "psycopg: nothing leaked (the close waited for the query and returned the "
        "connection), so garbage collection finds nothing: no warning, no pool log error, "
        "and the task's backend is still open, idle in the pool, for the next use.",
        expected={
            "warning": on(
                asyncpg=contains(
                    "SAWarning: The garbage collector is trying to clean up non-checked-in "
                    "connection"
                ),
                psycopg="no warning",
            ),
            "pool log errors": on(asyncpg=at_least(1), psycopg=0),
            "checked out after gc": 0,
            "the task's backend": more_than(0),
            "its backend gone": on(asyncpg=True, psycopg=False),
            "next use": "ok",
        },
        observed={
            "warning": leaked.warnings,
            "pool log errors": len(leaked.collected.logged),
            "checked out after gc": leaked.checked_out_after_gc,
            "the task's backend": leaked.pid,
            "its backend gone": leaked.backend_gone,
            "next use": leaked.next_use_after_gc,
        },
    )


@run.scenario
async def closed_while_the_task_connects(lab: Lab[Sizes]) -> None:
    """create_task(session.execute(pg_sleep)), then leave the session's `async with` at
    once, while the task is still checking out its connection."""
    found = await race_on_its_own_engine(lab, "connecting", "connecting")
    expected = {
        "close": matches(r"^IllegalStateChangeError: .*_connection_for_bind\(\)"),
        "task still running after the close": True,
        "task": "ok",
        "checked out": 1,
        "idle in transaction": 1,
        "second close": "ok",
        "checked out after the second close": 0,
    }
    lab.check(
        "closed while the task connects: IllegalStateChangeError",
        "The block exits right after create_task(session.execute(...)), while the task is "
        "still checking out its connection: close() is refused by the session's state guard, "
        "the task goes on and succeeds, and the connection it got stays checked out, 'idle in "
        "transaction', until a second close() returns it.",
        expected=expected,
        observed=found.observed(expected),
    )


@run.scenario
async def closed_while_the_query_runs(lab: Lab[Sizes]) -> None:
    """create_task(session.execute(pg_sleep)), wait until the server runs the sleep, then
    leave the session's `async with`; then drop the objects and collect garbage."""
    found = await race_on_its_own_engine(lab, "query", "query")
    expected = {
        "close": on(
            asyncpg=matches(r"^InterfaceError: .*another operation is in progress"),
            psycopg="no error",
        ),
        "task still running after the close": on(asyncpg=True, psycopg=False),
        "task": "ok",
        "checked out": on(asyncpg=1, psycopg=0),
        "idle in transaction": on(asyncpg=1, psycopg=0),
        "second close": "ok",
        "checked out after the second close": on(asyncpg=1, psycopg=0),
        "next use": on(asyncpg=prefix("TimeoutError"), psycopg="ok"),
    }
    lab.check(
        "closed while the task's query runs: asyncpg leaks the connection",
        "The block exits while the task's SELECT pg_sleep runs. asyncpg: close() fails "
        "(its ROLLBACK cannot run during the query: the dialect's rollback does not take the "
        "execute mutex), yet the task's query completes normally. The connection is neither "
        "returned nor invalidated: it stays checked out, its backend 'idle in transaction'; "
        "a second close() succeeds but changes nothing; the next checkout waits pool_timeout "
        "and fails. psycopg: no leak: its ROLLBACK waits on the AsyncConnection's lock until "
        "the task's query is done, so close() succeeds once the task has finished, the "
        "connection goes back to the pool and the next use works.",
        expected=expected,
        observed=found.observed(expected),
    )
    check_collected(lab, found)


@run.scenario
async def gather_fails_inside_the_block(lab: Lab[Sizes]) -> None:
    """Inside the session's `async with`, gather the pg_sleep task with a task that fails
    once the sleep runs on the server; then drop the objects and collect garbage."""
    found = await race_on_its_own_engine(lab, "gather", "gather")
    expected = {
        "leaves the block": on(asyncpg=prefix("InterfaceError"), psycopg=prefix("RuntimeError")),
        "its __context__": on(asyncpg=prefix("RuntimeError"), psycopg="none"),
        "task still running after the close": on(asyncpg=True, psycopg=False),
        "task": "ok",
        "checked out": on(asyncpg=1, psycopg=0),
        "next use": on(asyncpg=prefix("TimeoutError"), psycopg="ok"),
    }
    lab.check(
        "gather + async with: which error leaves the block",
        "gather() raises as soon as one task fails (RuntimeError) while the other task's query "
        "still runs, so the block closes the session under it. asyncpg: what leaves the block "
        "is the close's InterfaceError, the RuntimeError survives only as its __context__; the "
        "running task still succeeds and the connection leaks as above. psycopg: the close "
        "waits for the running query (psycopg's connection lock), then succeeds, so the "
        "RuntimeError itself leaves the block, the task has finished by then and the "
        "connection is back in the pool.",
        expected=expected,
        observed=found.observed(expected),
    )
    check_collected(lab, found)


@run.scenario
async def gather_with_return_exceptions(lab: Lab[Sizes]) -> None:
    """The same gather with return_exceptions=True inside the session's `async with`."""
    found = await race_on_its_own_engine(lab, "gather, return_exceptions", "gather-rx")
    lab.check(
        "gather(return_exceptions=True) inside the block: clean close",
        "With return_exceptions=True, gather() returns only when every task is done, so the "
        "block closes an idle session: no error, the failure comes back as a result, the "
        "connection is returned, nothing to collect.",
        expected={
            "block": "no error",
            "results": ["ok", prefix("RuntimeError")],
            "checked out": 0,
            "next use": "ok",
            "warnings": [],
        },
        observed={
            "block": found.block,
            "results": found.gathered,
            "checked out": found.checked_out_after_task,
            "next use": found.next_use,
            "warnings": found.collected.warning_lines(" <"),
        },
    )


# --- one session per task -----------------------------------------------------------------


@run.scenario
async def one_session_per_task(lab: Lab[Sizes]) -> None:
    """N tasks, each with its own session on an engine with N warm connections, send their
    pg_sleep together (a barrier); then the same N sleeps one after another on one session."""
    tasks, sleep = lab.sizes.tasks, lab.sizes.sleep
    app = lab.name("per-task")
    engine = lab.engine_with(
        pool_size=tasks, max_overflow=0, pool_timeout=WAIT_BOUND, application_name=app
    )
    sessions = lab.sessions_on(engine)

    async def warm() -> None:
        async with engine.connect() as conn:
            await conn.execute(select(1))

    await asyncio.gather(*(warm() for _ in range(tasks)))  # open the connections first

    ready = asyncio.Barrier(tasks)

    async def own_session() -> int:
        async with sessions() as session:
            await session.connection()  # check out (and pre-ping) first,
            await ready.wait()  # so that all the sleeps are sent together
            return await sleep_in(session, sleep)

    parallel = await gather_sleeps(lab, app, (own_session() for _ in range(tasks)))

    started = time.perf_counter()
    async with sessions() as session, asyncio.timeout(WAIT_BOUND):
        for _ in range(tasks):
            await sleep_in(session, sleep)
    sequential = time.perf_counter() - started

    lab.check(
        "one session per task: the sleeps run side by side",
        f"{tasks} tasks, each with its own session, all succeed on {tasks} different backends, "
        f"and the server sees all {tasks} in pg_sleep at the same moment.",
        expected={
            "errors": [],
            "backends": tasks,
            "most in pg_sleep at once": tasks,
            "samples that saw a pg_sleep": at_least(1),
        },
        observed={
            "errors": [o for o in parallel.outcomes if o != "ok"],
            "backends": len(parallel.pids),
            "most in pg_sleep at once": parallel.most_at_once,
            "samples that saw a pg_sleep": parallel.samples_in_sleep,
        },
    )
    lab.figure(f"{tasks} x pg_sleep({sleep}), one session per task (gather)", parallel.wall, "s")
    lab.figure(f"{tasks} x pg_sleep({sleep}), one after another on one session", sequential, "s")
    lab.figure("speed-up (sequential / parallel)", sequential / parallel.wall, "x")
    lab.figure("samples of pg_stat_activity (gather)", len(parallel.samples))
    await engine.dispose()


# --- async_scoped_session(scopefunc=current_task) -----------------------------------------


def scoped_on_own_engine(
    lab: Lab[Sizes], name: str
) -> tuple[AsyncEngine, async_scoped_session[AsyncSession]]:
    """A registry of sessions keyed on the current task, on an engine of its own with room
    for every task (``application_name`` = ``<tag><name>``)."""
    engine = lab.engine_with(
        pool_size=lab.sizes.tasks,
        max_overflow=1,
        pool_timeout=WAIT_BOUND,
        application_name=lab.name(name),
    )
    return engine, async_scoped_session(lab.sessions_on(engine), scopefunc=asyncio.current_task)


def registry_size(scoped: async_scoped_session[AsyncSession]) -> int:
    return len(scoped.registry.registry)


async def use_scoped(
    scoped: async_scoped_session[AsyncSession], *, remove: bool
) -> tuple[AsyncSession, bool]:
    """One task's use: its session, and whether scoped() stayed that session throughout
    (also inside a coroutine it awaits); ``remove``: ``await scoped.remove()`` at the end."""

    async def nested() -> AsyncSession:
        await scoped.execute(select(1))
        return scoped()

    try:
        session = scoped()
        inner = await nested()  # a coroutine awaited in the same task
        return session, inner is session and scoped() is session
    finally:
        if remove:
            await scoped.remove()


@run.scenario
async def scoped_session_in_one_task(lab: Lab[Sizes]) -> None:
    """async_scoped_session(scopefunc=current_task): scoped() twice in the current task,
    then await scoped.remove()."""
    engine, scoped = scoped_on_own_engine(lab, "scoped-one")
    before = registry_size(scoped)
    first, again = scoped(), scoped()
    during = registry_size(scoped)
    await scoped.remove()
    after = registry_size(scoped)
    lab.check(
        "current task: one session, until remove()",
        "Within one task every scoped() call returns the same session, held in the registry "
        "under the task; await scoped.remove() closes it and empties that slot.",
        expected={"scoped() twice: the same session": True, "registry size": [0, 1, 0]},
        observed={
            "scoped() twice: the same session": first is again,
            "registry size": [before, during, after],
        },
    )
    await engine.dispose()


@run.scenario
async def scoped_sessions_without_remove(lab: Lab[Sizes]) -> None:
    """N gathered tasks each use scoped() (also in a coroutine they await) and end without
    remove(); then the parent task's remove(), then the sessions closed by hand."""
    tasks = lab.sizes.tasks
    app = lab.name("scoped-kept")
    engine, scoped = scoped_on_own_engine(lab, "scoped-kept")
    async with asyncio.timeout(WAIT_BOUND):
        kept = await asyncio.gather(*(use_scoped(scoped, remove=False) for _ in range(tasks)))
    keys = list(scoped.registry.registry)
    observed = {
        "registry size": registry_size(scoped),
        "finished tasks in it": sum(isinstance(k, asyncio.Task) and k.done() for k in keys),
        "checked out": probes.checked_out(engine),
        "idle in transaction": await probes.backends(lab.engine, app, state="idle in transaction"),
    }
    await scoped.remove()  # the parent task's remove() does not reach the children's sessions
    observed["after the parent's remove()"] = registry_size(scoped)
    for session in list(scoped.registry.registry.values()):
        await session.close()
    scoped.registry.registry.clear()
    observed["checked out once closed by hand"] = probes.checked_out(engine)
    lab.check(
        "different tasks, different sessions",
        f"{tasks} gathered tasks get {tasks} different sessions; inside each task (also in a "
        "coroutine it awaits) scoped() is always the same one.",
        expected={"distinct sessions": tasks, "stable within each task": each(True)},
        observed={
            "distinct sessions": len({id(s) for s, _ in kept}),
            "stable within each task": [same for _, same in kept],
        },
    )
    del kept, keys
    lab.check(
        "without remove(): finished tasks keep their sessions and connections",
        "When the tasks end without remove(), the registry still holds one entry per "
        "finished task (the Task object is the key), each session still holds its connection "
        "in an open transaction, and the parent's remove() clears only its own slot.",
        expected={
            "registry size": tasks,
            "finished tasks in it": tasks,
            "checked out": tasks,
            "idle in transaction": tasks,
            "after the parent's remove()": tasks,
            "checked out once closed by hand": 0,
        },
        observed=observed,
    )
    await engine.dispose()


@run.scenario
async def scoped_sessions_with_remove(lab: Lab[Sizes]) -> None:
    """The same N gathered tasks, each ending with await scoped.remove() in a finally."""
    tasks = lab.sizes.tasks
    engine, scoped = scoped_on_own_engine(lab, "scoped-removed")
    async with asyncio.timeout(WAIT_BOUND):
        cleaned = await asyncio.gather(*(use_scoped(scoped, remove=True) for _ in range(tasks)))
    lab.check(
        "remove() at the end of each task empties the registry",
        "The docs' rule: await scoped.remove() in a finally at the end of each task. Then "
        "the registry is empty and every connection is back in the pool.",
        expected={"distinct sessions": tasks, "registry size": 0, "checked out": 0},
        observed={
            "distinct sessions": len({id(s) for s, _ in cleaned}),
            "registry size": registry_size(scoped),
            "checked out": probes.checked_out(engine),
        },
    )
    await engine.dispose()
