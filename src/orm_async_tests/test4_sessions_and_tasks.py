"""Experiment 4: sessions and tasks.

One ``AsyncSession`` is one transaction on at most one connection: what
happens when several asyncio tasks share it (concurrent reads; the session
closed by ``async with`` while a task still uses it), how much one session
per task buys in wall time, and how ``async_scoped_session`` keyed on
``asyncio.current_task`` hands out and keeps sessions.

Every misuse runs on its own small engine (``lab.engine_with``) whose
connections carry their own ``application_name``, so ``pg_stat_activity``
shows exactly what the misuse left behind and nothing reaches the shared pool.

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
  close (rollback) during a running query fails.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_scoped_session,
)

from . import probes
from .capture import Captured, captured, manual_gc
from .db import create_session_factory
from .harness import Lab, describe, experiment, one_transaction, outcome
from .probes import checked_out

POOL_TIMEOUT = 0.5  # seconds a checkout waits on the misuse engines: bounds "next use"
WAIT_BOUND = 10.0  # upper bound for any wait on the server or on a task


async def sleep_in(session: AsyncSession, seconds: float) -> int:
    """``SELECT pg_backend_pid() FROM pg_sleep(:s)``: sleeps, then says which backend ran it."""
    pid = await session.scalar(select(func.pg_backend_pid()).select_from(func.pg_sleep(seconds)))
    return int(pid or 0)


async def sleeping_on_server(lab: Lab, app: str) -> bool:
    """Wait (bounded) until one of ``app``'s backends runs pg_sleep; False if none did."""
    found = await probes.poll(
        lambda: probes.sleepers(lab.engine, app), lambda n: n > 0, within=WAIT_BOUND, every=0.005
    )
    return found.held


async def gather_sleeps(
    lab: Lab, app: str, sleeps: Iterable[Awaitable[int]]
) -> tuple[list[int | BaseException], float, int]:
    """Gather ``sleeps`` (bounded, exceptions returned): their results, the wall time, and
    the peak number of ``app``'s backends in pg_sleep at the same moment meanwhile."""
    sampler = probes.Peak(lambda: probes.sleepers(lab.engine, app), within=WAIT_BOUND, every=0.005)
    started = time.perf_counter()
    async with asyncio.timeout(WAIT_BOUND):
        results = await asyncio.gather(*sleeps, return_exceptions=True)
    wall = time.perf_counter() - started
    return results, wall, await sampler.stop()


def misuse_engine(lab: Lab, name: str, pool_size: int = 1) -> tuple[AsyncEngine, str]:
    """A small engine of its own (no overflow, short pool timeout) named ``<tag><name>``."""
    app = f"{lab.tag}{name}"
    engine = lab.engine_with(
        pool_size=pool_size, max_overflow=0, pool_timeout=POOL_TIMEOUT, application_name=app
    )
    return engine, app


@experiment(4, "Sessions and tasks")
async def run(lab: Lab, *, tasks: int = 5, sleep: float = 0.2, race_sleep: float = 0.5) -> None:
    """What happens when concurrent tasks share one AsyncSession (concurrent reads, and the
    session closed by `async with` while a task still uses it), how much does one session
    per task gain with N parallel pg_sleep calls, and how does async_scoped_session scoped
    to the current task hand out and keep sessions?"""
    await shared_session_reads(lab, tasks, sleep)
    await close_races(lab, race_sleep)
    await session_per_task(lab, tasks, sleep)
    await scoped_sessions(lab, tasks)


# --- one session, N concurrent reads ------------------------------------------------------


@dataclass
class SharedReads:
    results: list[str]
    pids: set[int]
    peak: int
    wall: float
    next_use: list[str]

    def tally(self) -> str:
        counts: dict[str, int] = {}
        for result in self.results:
            counts[result] = counts.get(result, 0) + 1
        return "; ".join(f"{n} x {r}" for r, n in sorted(counts.items(), key=lambda x: -x[1]))


async def shared_session_reads(lab: Lab, tasks: int, sleep: float) -> None:
    found: dict[str, SharedReads] = {}
    for variant in ("fresh", "holding"):
        # room for `tasks` connections: if the session could fan out, it would
        engine, app = misuse_engine(lab, f"reads-{variant}", pool_size=tasks)
        sessions = create_session_factory(engine)
        async with sessions() as session:
            if variant == "holding":
                await session.execute(select(1))
            results, wall, peak = await gather_sleeps(
                lab, app, (sleep_in(session, sleep) for _ in range(tasks))
            )
        found[variant] = SharedReads(
            ["ok" if isinstance(r, int) else describe(r) for r in results],
            {r for r in results if isinstance(r, int)},
            peak,
            wall,
            [await outcome(one_transaction(sessions)) for _ in range(2)],
        )
        await engine.dispose()

    fresh, holding = found["fresh"], found["holding"]
    refused = [r for r in fresh.results if r != "ok"]
    lab.check(
        "shared fresh session: one read runs, the others are refused",
        f"{tasks} tasks gather session.execute(SELECT pg_sleep) on ONE session that has no "
        "connection yet: the first task starts provisioning the connection, every other task "
        "is refused at once by SQLAlchemy's session state guard.",
        expected=f"1 x ok; {tasks - 1} x InvalidRequestError: This session is provisioning a "
        "new connection; concurrent operations are not permitted",
        observed=fresh.tally(),
        passed=fresh.results.count("ok") == 1
        and len(refused) == tasks - 1
        and all(
            r.startswith("InvalidRequestError") and "provisioning a new connection" in r
            for r in refused
        ),
    )
    lab.check(
        "shared session holding a connection: reads are queued, not refused",
        f"The same {tasks} reads on a session that already holds its connection all succeed: "
        "the asyncpg dialect queues them on that one connection (one backend, never two "
        "pg_sleep at once, although the pool had room for more): serialised, not parallel.",
        expected=f"{tasks} x ok; 1 backend; peak 1 in pg_sleep at once",
        observed=f"{holding.tally()}; {len(holding.pids)} backend(s); "
        f"peak {holding.peak} in pg_sleep at once",
        passed=holding.results.count("ok") == tasks
        and len(holding.pids) == 1
        and holding.peak == 1,
    )
    lab.check(
        "concurrent reads leave the pool healthy",
        "Unlike the shared-session writes of experiment 1, these concurrent reads leave no "
        "broken connection behind: the next two transactions on each engine work.",
        expected="fresh: ok, ok; holding: ok, ok",
        observed=f"fresh: {', '.join(fresh.next_use)}; holding: {', '.join(holding.next_use)}",
        passed=all(r == "ok" for r in fresh.next_use + holding.next_use),
    )
    lab.figure(f"{tasks} reads shared on one session holding a connection", holding.wall, "s")
    lab.figure("shared-session reads: wall time / one sleep", holding.wall / sleep, "x")


# --- the session closed while a task still uses it ----------------------------------------


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
    gathered: str = ""
    # after the race's objects are dropped and collected
    collected: Captured = field(default_factory=Captured)
    checked_out_after_gc: int = -1
    pid: int = 0  # the task's backend
    backend_gone: bool = False  # that backend has left pg_stat_activity
    next_use_after_gc: str = "?"


async def fail_when_sleeping(lab: Lab, app: str) -> None:
    await sleeping_on_server(lab, app)
    raise RuntimeError("another task failed")


async def race(lab: Lab, engine: AsyncEngine, app: str, variant: str, sleep: float) -> Race:
    """Leave ``async with sessions() as session:`` while a task still uses ``session``."""
    sessions = create_session_factory(engine)
    found = Race()
    job: asyncio.Task[int] | None = None
    try:
        async with sessions() as session:
            job = asyncio.create_task(sleep_in(session, sleep))
            if variant == "connecting":
                await asyncio.sleep(0)  # the task has started to check out a connection
            elif variant == "query":
                await sleeping_on_server(lab, app)
            elif variant == "gather":
                await asyncio.gather(job, fail_when_sleeping(lab, app))
            else:  # "gather, return_exceptions"
                results = await asyncio.gather(
                    job, fail_when_sleeping(lab, app), return_exceptions=True
                )
                found.gathered = ", ".join(
                    describe(r) if isinstance(r, BaseException) else "ok" for r in results
                )
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
    found.checked_out_after_task = checked_out(engine)
    found.idle_in_transaction = await probes.backends(lab.engine, app, state="idle in transaction")
    found.second_close = await outcome(session.close())
    found.checked_out_after_second_close = checked_out(engine)
    found.next_use = await outcome(one_transaction(sessions))  # bounded by POOL_TIMEOUT
    return found


async def close_races(lab: Lab, sleep: float) -> None:
    found: dict[str, Race] = {}
    for variant in ("connecting", "query", "gather", "gather, return_exceptions"):
        engine, app = misuse_engine(lab, f"race-{len(found)}")
        with captured() as collected, manual_gc():
            # only the collect at the end of captured() may reclaim a leaked connection
            result = await race(lab, engine, app, variant, sleep)
        result.collected = collected
        result.checked_out_after_gc = checked_out(engine)
        if result.checked_out_after_second_close:  # leaked until collected
            # a terminated backend leaves pg_stat_activity a moment later
            result.backend_gone = await backend_gone(lab, app, result.pid, within=2.0)
        result.next_use_after_gc = await outcome(one_transaction(create_session_factory(engine)))
        found[variant] = result
        await engine.dispose()

    connecting = found["connecting"]
    lab.check(
        "closed while the task connects: IllegalStateChangeError",
        "The block exits right after create_task(session.execute(...)), while the task is "
        "still checking out its connection: close() is refused by the session's state guard, "
        "the task goes on and succeeds, and the connection it got stays checked out, 'idle in "
        "transaction', until a second close() returns it.",
        expected="close: IllegalStateChangeError (_connection_for_bind() in progress); task: "
        "still running, then ok; 1 checked out, 1 idle in transaction; second close: ok, "
        "0 checked out",
        observed=f"close: {connecting.block}; task: "
        f"{'still running' if connecting.running_after_close else 'done'}, then {connecting.task}; "
        f"{connecting.checked_out_after_task} checked out, {connecting.idle_in_transaction} "
        f"idle in transaction; second close: {connecting.second_close}, "
        f"{connecting.checked_out_after_second_close} checked out",
        passed=connecting.block.startswith("IllegalStateChangeError")
        and "_connection_for_bind()" in connecting.block
        and connecting.running_after_close
        and connecting.task == "ok"
        and connecting.checked_out_after_task == 1
        and connecting.idle_in_transaction == 1
        and connecting.second_close == "ok"
        and connecting.checked_out_after_second_close == 0,
    )
    query = found["query"]
    lab.check(
        "closed while the task's query runs: the connection leaks",
        "The block exits while the task's SELECT pg_sleep runs: close() fails in asyncpg "
        "(its ROLLBACK cannot run during the query), yet the task's query completes normally. "
        "The connection is neither returned nor invalidated: it stays checked out, its backend "
        "'idle in transaction'; a second close() succeeds but changes nothing; the next "
        "checkout waits pool_timeout and fails.",
        expected="close: InterfaceError: ... another operation is in progress; task: still "
        "running, then ok; 1 checked out, 1 idle in transaction; second close: ok, still 1 "
        "checked out; next use: TimeoutError",
        observed=f"close: {query.block}; task: "
        f"{'still running' if query.running_after_close else 'done'}, then {query.task}; "
        f"{query.checked_out_after_task} "
        f"checked out, {query.idle_in_transaction} idle in transaction; second close: "
        f"{query.second_close}, {query.checked_out_after_second_close} checked out; "
        f"next use: {query.next_use}",
        passed=query.block.startswith("InterfaceError")
        and "another operation is in progress" in query.block
        and query.running_after_close
        and query.task == "ok"
        and query.checked_out_after_task == 1
        and query.idle_in_transaction == 1
        and query.second_close == "ok"
        and query.checked_out_after_second_close == 1
        and query.next_use.startswith("TimeoutError"),
    )
    gather = found["gather"]
    lab.check(
        "gather + async with: the close error replaces the task's error",
        "gather() raises as soon as one task fails (RuntimeError) while the other task's query "
        "still runs, so the block closes the session under it: what leaves the block is the "
        "close's InterfaceError, the RuntimeError survives only as its __context__; the "
        "running task still succeeds and the connection leaks as above.",
        expected="InterfaceError (context: RuntimeError); task: still running, then ok; "
        "1 checked out; next use: TimeoutError",
        observed=f"{gather.block} (context: {gather.context}); task: "
        f"{'still running' if gather.running_after_close else 'done'}, then {gather.task}; "
        f"{gather.checked_out_after_task} checked out; next use: {gather.next_use}",
        passed=gather.block.startswith("InterfaceError")
        and gather.context.startswith("RuntimeError")
        and gather.running_after_close
        and gather.task == "ok"
        and gather.checked_out_after_task == 1
        and gather.next_use.startswith("TimeoutError"),
    )
    leaked = [found["query"], found["gather"]]
    lab.check(
        "only the garbage collector gets a leaked connection back",
        "Once the leaked session and task are dropped, garbage collection finds the connection "
        "still checked out: the pool warns (SAWarning), logs an error, and terminates it; the "
        "pool is then empty and usable again with a new connection.",
        expected="per leak: SAWarning 'The garbage collector is trying to clean up "
        "non-checked-in connection ...'; then 0 checked out, its backend gone: True, next use ok",
        observed=" | ".join(
            f"{'; '.join(r.collected.warning_lines(' <')) or 'no warning'}; "
            f"pool log: {len(r.collected.logged)} error(s); "
            f"{r.checked_out_after_gc} checked out, its backend gone: {r.backend_gone}, "
            f"next use {r.next_use_after_gc}"
            for r in leaked
        ),
        passed=all(
            any("non-checked-in connection" in w for w in r.collected.warning_lines(" <"))
            and r.checked_out_after_gc == 0
            and r.pid != 0
            and r.backend_gone
            and r.next_use_after_gc == "ok"
            for r in leaked
        ),
    )
    fixed = found["gather, return_exceptions"]
    lab.check(
        "gather(return_exceptions=True) inside the block: clean close",
        "With return_exceptions=True, gather() returns only when every task is done, so the "
        "block closes an idle session: no error, the failure comes back as a result, the "
        "connection is returned, nothing to collect.",
        expected="block: no error; results: ok, RuntimeError; 0 checked out; next use: ok; "
        "no warning",
        observed=f"block: {fixed.block}; results: {fixed.gathered}; "
        f"{fixed.checked_out_after_task} checked out; next use: {fixed.next_use}; "
        f"{'; '.join(fixed.collected.warning_lines(' <')) or 'no warning'}",
        passed=fixed.block == "no error"
        and fixed.gathered.startswith("ok, RuntimeError")
        and fixed.checked_out_after_task == 0
        and fixed.next_use == "ok"
        and not fixed.collected.caught,
    )


async def backend_gone(lab: Lab, app: str, pid: int, *, within: float) -> bool:
    """Wait (bounded) until backend ``pid`` is no longer among ``app``'s connections."""
    found = await probes.poll(
        lambda: probes.backend_pids(lab.engine, app),
        lambda pids: pid not in pids,
        within=within,
        every=0.005,
    )
    return found.held


# --- one session per task -----------------------------------------------------------------


async def session_per_task(lab: Lab, tasks: int, sleep: float) -> None:
    app = f"{lab.tag}per-task"
    engine = lab.engine_with(
        pool_size=tasks, max_overflow=0, pool_timeout=WAIT_BOUND, application_name=app
    )
    sessions = create_session_factory(engine)

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

    results, parallel, peak = await gather_sleeps(lab, app, (own_session() for _ in range(tasks)))

    started = time.perf_counter()
    async with sessions() as session, asyncio.timeout(WAIT_BOUND):
        for _ in range(tasks):
            await sleep_in(session, sleep)
    sequential = time.perf_counter() - started

    errors = [describe(r) for r in results if isinstance(r, BaseException)]
    pids = {r for r in results if isinstance(r, int)}
    lab.check(
        "one session per task: the sleeps run side by side",
        f"{tasks} tasks, each with its own session, all succeed on {tasks} different backends, "
        f"and the server sees all {tasks} in pg_sleep at the same moment.",
        expected=f"no error; {tasks} backends; peak {tasks} in pg_sleep at once",
        observed=f"{'; '.join(errors) or 'no error'}; {len(pids)} backends; "
        f"peak {peak} in pg_sleep at once",
        passed=not errors and len(pids) == tasks and peak == tasks,
    )
    lab.figure(f"{tasks} x pg_sleep({sleep}), one session per task (gather)", parallel, "s")
    lab.figure(f"{tasks} x pg_sleep({sleep}), one after another on one session", sequential, "s")
    lab.figure("speed-up (sequential / parallel)", sequential / parallel, "x")
    await engine.dispose()


# --- async_scoped_session(scopefunc=current_task) -----------------------------------------


async def scoped_sessions(lab: Lab, tasks: int) -> None:
    app = f"{lab.tag}scoped"
    engine = lab.engine_with(
        pool_size=tasks, max_overflow=1, pool_timeout=WAIT_BOUND, application_name=app
    )
    scoped = async_scoped_session(create_session_factory(engine), scopefunc=asyncio.current_task)

    def registry_size() -> int:
        return len(scoped.registry.registry)

    # the current task
    before = registry_size()
    first, again = scoped(), scoped()
    during = registry_size()
    await scoped.remove()
    after = registry_size()
    lab.check(
        "current task: one session, until remove()",
        "Within one task every scoped() call returns the same session, held in the registry "
        "under the task; await scoped.remove() closes it and empties that slot.",
        expected="same object; registry 0 -> 1 -> 0",
        observed=f"{'same' if first is again else 'different'} object; "
        f"registry {before} -> {during} -> {after}",
        passed=first is again and (before, during, after) == (0, 1, 0),
    )

    async def nested() -> AsyncSession:
        await scoped.execute(select(1))
        return scoped()

    async def use(remove: bool) -> tuple[AsyncSession, bool]:
        try:
            session = scoped()
            inner = await nested()  # a coroutine awaited in the same task
            return session, inner is session and scoped() is session
        finally:
            if remove:
                await scoped.remove()

    # without remove(): the sessions (and their connections) outlive their tasks
    async with asyncio.timeout(WAIT_BOUND):
        kept = await asyncio.gather(*(use(remove=False) for _ in range(tasks)))
    distinct = len({id(s) for s, _ in kept})
    stable = all(same for _, same in kept)
    keys = list(scoped.registry.registry)
    finished = sum(isinstance(k, asyncio.Task) and k.done() for k in keys)
    held = checked_out(engine)
    idle = await probes.backends(lab.engine, app, state="idle in transaction")
    kept_size = registry_size()
    await scoped.remove()  # the parent task's remove() does not reach the children's sessions
    after_parent_remove = registry_size()
    for session in list(scoped.registry.registry.values()):
        await session.close()
    scoped.registry.registry.clear()
    released = checked_out(engine)
    del kept, keys

    lab.check(
        "different tasks, different sessions",
        f"{tasks} gathered tasks get {tasks} different sessions; inside each task (also in a "
        "coroutine it awaits) scoped() is always the same one.",
        expected=f"{tasks} distinct sessions; stable within each task: True",
        observed=f"{distinct} distinct sessions; stable within each task: {stable}",
        passed=distinct == tasks and stable,
    )
    lab.check(
        "without remove(): finished tasks keep their sessions and connections",
        "When the tasks end without remove(), the registry still holds one entry per "
        "finished task (the Task object is the key), each session still holds its connection "
        "in an open transaction, and the parent's remove() clears only its own slot.",
        expected=f"registry {tasks} ({tasks} finished tasks); {tasks} checked out, {tasks} "
        f"idle in transaction; after the parent's remove(): {tasks}; closed by hand: 0 "
        "checked out",
        observed=f"registry {kept_size} "
        f"({finished} finished tasks); {held} checked out, {idle} idle in transaction; "
        f"after the parent's remove(): {after_parent_remove}; closed by hand: {released} "
        "checked out",
        passed=kept_size == tasks
        and finished == tasks
        and held == tasks
        and idle == tasks
        and after_parent_remove == tasks
        and released == 0,
    )

    # with remove() at the end of each task
    async with asyncio.timeout(WAIT_BOUND):
        cleaned = await asyncio.gather(*(use(remove=True) for _ in range(tasks)))
    lab.check(
        "remove() at the end of each task empties the registry",
        "The docs' rule: await scoped.remove() in a finally at the end of each task. Then "
        "the registry is empty and every connection is back in the pool.",
        expected=f"{tasks} distinct sessions; registry 0; 0 checked out",
        observed=f"{len({id(s) for s, _ in cleaned})} distinct sessions; "
        f"registry {registry_size()}; {checked_out(engine)} checked out",
        passed=len({id(s) for s, _ in cleaned}) == tasks
        and registry_size() == 0
        and checked_out(engine) == 0,
    )
    await engine.dispose()
