"""What happens to a pooled engine used from a second event loop (the pytest-asyncio
pitfall), which fixes work, and how do sync-only APIs and ORM events work with
AsyncEngine / AsyncSession?

With asyncpg, an ``AsyncEngine``'s pooled connections belong to the event loop
that opened them (psycopg's do not: one of the differences observed). A test
suite that keeps one engine while pytest-asyncio gives each test a new loop (its
default ``loop_scope="function"``) reuses a connection from a dead or foreign
loop. The cross-loop cases run in a child process: what they leave behind
(unawaited coroutines, "Future exception was never retrieved", pool error logs)
must not leak into this process.

Then two things async code still needs the sync API for: ``inspect()`` and
``MetaData.create_all`` through ``AsyncConnection.run_sync``, and ORM event
listeners, which attach to ``AsyncSession.sync_session``.

Sources: SQLAlchemy asyncio docs, "Using multiple asyncio event loops" (use
``NullPool`` or dispose the engine per loop; ``dispose(close=False)``), "Using
the Inspector to inspect schema objects", "Using events with the asyncio
extension" (events are synchronous, listen on ``sync_session`` /
``sync_engine``); pytest-asyncio docs, "How to change the default event loop
scope" (``loop_scope``); SQLAlchemy discussion "Task got Future attached to a
different loop" with pytest-asyncio (issues #6409, #8145 and their duplicates).
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Column, Integer, MetaData, Table, event, inspect, select, text
from sqlalchemy.exc import InvalidRequestError, NoInspectionAvailable
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from .db import open_database
from .lab import Lab, capture, child, describe, experiment, on, one_of, prefix
from .models import User


@dataclass(frozen=True)
class Sizes:
    child_timeout: float = 60.0
    """Seconds each child process may run before it is killed."""


run = experiment(12, "Event loops, run_sync and ORM events", Sizes)


# ---------------------------------------------------------------- the child process
async def one_query(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        await conn.scalar(text("SELECT 1"))


def in_new_loop(work: Callable[[], Coroutine[Any, Any, Any]]) -> str:
    """Run ``work`` in a brand-new event loop (``asyncio.run``): "ok" or the error."""
    try:
        asyncio.run(work())
    except Exception as exc:
        text = describe(exc)
        # "Task <Task pending name=... coro=<...>> got Future <...> attached to a different loop"
        return re.sub(r"Task <.*> got Future <.*> attached", "Task got Future attached", text)
    return "ok"


def in_thread_loop(work: Callable[[], Coroutine[Any, Any, Any]]) -> str:
    box: list[str] = []
    thread = threading.Thread(target=lambda: box.append(in_new_loop(work)))
    thread.start()
    thread.join(30)
    return box[0] if box else "no answer within 30 s"


def pooled_sequential() -> list[str]:
    db = open_database(pool_size=1, max_overflow=0)
    return [in_new_loop(lambda: one_query(db.engine)) for _ in range(3)]


def pooled_concurrent() -> list[str]:
    db = open_database(pool_size=1, max_overflow=0)

    async def main() -> list[str]:
        try:
            await one_query(db.engine)  # the pooled connection now belongs to this loop
        except Exception as exc:
            return [describe(exc)]
        other = await asyncio.to_thread(in_thread_loop, lambda: one_query(db.engine))
        return ["ok", other]

    return asyncio.run(main())


def nullpool() -> list[str]:
    db = open_database(poolclass=NullPool)
    return [in_new_loop(lambda: one_query(db.engine)) for _ in range(3)]


def dispose_each_loop() -> list[str]:
    db = open_database(pool_size=1, max_overflow=0)

    async def use_then_dispose() -> None:
        await one_query(db.engine)
        await db.engine.dispose()

    return [in_new_loop(use_then_dispose) for _ in range(3)]


def dispose_no_close() -> list[str]:
    db = open_database(pool_size=1, max_overflow=0)

    async def forget_then_use() -> None:
        await db.engine.dispose(close=False)  # drop the pool's connections, don't touch them
        await one_query(db.engine)

    return [in_new_loop(forget_then_use) for _ in range(3)]


SEQUENTIAL = "pooled, loops one after another"
CONCURRENT = "pooled, second loop while the first runs"  # may crash its process: run it apart
FIXES = {
    "NullPool": (
        nullpool,
        "With NullPool every checkout opens a new connection in the current loop, "
        "so three loops in turn all work.",
    ),
    "dispose() at the end of each loop": (
        dispose_each_loop,
        "Disposing the engine at the end of each loop "
        "(in that loop) leaves nothing for the next loop: three loops all work.",
    ),
    "dispose(close=False) at the start of each loop": (
        dispose_no_close,
        "dispose(close=False) at the start "
        "of a new loop drops the old loop's connections without touching them: all work.",
    ),
}
CASES: dict[str, Callable[[], list[str]]] = {
    SEQUENTIAL: pooled_sequential,
    CONCURRENT: pooled_concurrent,
    **{name: steps for name, (steps, _) in FIXES.items()},
}
CRASHES = ("killed by SIGSEGV", "killed by SIGABRT")
"""How the documented crash of the concurrent case ends the child (``ChildRun.ended()``)."""
SECOND_LOOP_FAILS = one_of(
    prefix("RuntimeError"),
    prefix("InterfaceError: cannot perform operation: another operation is in progress"),
)
"""How the second loop's query fails when the child survives."""


def loop_cases(names: list[str]) -> Iterator[dict[str, Any]]:
    """In the child: run the named cases (each uses several event loops in turn), one
    item each, with what SQLAlchemy logged at ERROR (e.g. "Exception terminating
    connection") and what was warned, garbage collection included."""
    logging.getLogger("sqlalchemy").propagate = False
    for name in names:
        with capture.captured("sqlalchemy", logging.ERROR) as noise:
            results = CASES[name]()
        yield {
            "case": name,
            "results": results,
            "logged_errors": [message.split("\n")[0] for message in noise.logged],
            "warnings": noise.warning_lines(),
        }


@dataclass(frozen=True)
class Cases:
    """What one child reported per case, and how the child ended."""

    reported: dict[str, dict[str, Any]]
    ended: str
    """How the child ended (``ChildRun.ended()``), with what it raised, if it raised."""
    stderr: list[str]
    """The child's stderr, line by line."""

    def results(self, name: str) -> list[str]:
        """The case's results, or one line saying it did not report (and how the child
        ended)."""
        if name in self.reported:
            return [str(r) for r in self.reported[name]["results"]]
        return [f"not reported (child: {self.ended})"]

    def warned(self, name: str) -> list[str]:
        """What the case's block warned (garbage collection included)."""
        return [str(w) for w in self.reported.get(name, {}).get("warnings", [])]


async def in_child(lab: Lab[Sizes], names: list[str]) -> Cases:
    done = await child.call(lab, loop_cases, names, within=lab.sizes.child_timeout)
    ended = done.ended() if done.error is None else f"{done.ended()}, raised {done.error}"
    return Cases(
        {str(item["case"]): item for item in done.items},
        ended,
        done.stderr.strip().splitlines(),
    )


@asynccontextmanager
async def loops_in_turn(lab: Lab[Sizes]) -> AsyncIterator[Cases]:
    """One child process runs the cases whose loops run one after another."""
    yield await in_child(lab, [SEQUENTIAL, *FIXES])


# ---------------------------------------------------------------- the scenarios
@run.scenario
async def pooled_engine_in_the_next_loop(lab: Lab[Sizes]) -> None:
    """In a child process, a pooled engine (one connection) used by three event loops in
    turn (asyncio.run three times), as pytest-asyncio's function-scoped loops do."""
    cases = await lab.use(loops_in_turn)
    lab.check(
        "pooled engine in the next loop: asyncpg's first use fails",
        "With asyncpg, a connection pooled by a finished event loop fails when a new loop "
        "checks it out (its transport belongs to the closed loop): the first query in the "
        "second loop raises; the pool then discards that connection and the third loop "
        "works. Observed with psycopg: every loop works, since psycopg's AsyncConnection "
        "is tied to no loop (it waits on its socket through whichever loop runs the "
        "operation); only a ResourceWarning for the connection left open remains.",
        expected=on(asyncpg=["ok", prefix("RuntimeError"), "ok"], psycopg=["ok", "ok", "ok"]),
        observed=cases.results(SEQUENTIAL),
    )
    noise = cases.reported.get(SEQUENTIAL, {})
    warned = cases.warned(SEQUENTIAL)
    lab.note(
        "Beside the exception, the failed cross-loop checkout makes SQLAlchemy log "
        f"{len(noise.get('logged_errors', []))} error record(s) such as "
        f"{(noise.get('logged_errors') or ['(none)'])[0]!r}; the case warned "
        f"{len(warned)} time(s) (first: {(warned or ['(none)'])[0]!r}) and the child process "
        f"printed {len(cases.stderr)} line(s) on stderr (first: "
        f"{(cases.stderr or ['(none)'])[0]!r}): the noise a test suite shows."
    )


@run.scenario
async def pooled_engine_from_a_second_loop_at_once(lab: Lab[Sizes]) -> None:
    """In a child process of its own (it may crash): a pooled engine whose connection
    belongs to a running loop, used at the same time by a loop in another thread."""
    cases = await in_child(lab, [CONCURRENT])
    lab.check(
        "pooled engine, concurrent second loop: asyncpg fails",
        "With asyncpg, using the engine from another thread's loop while the first loop "
        "still runs fails the same way (the pooled connection is attached to the first "
        "loop) or asyncpg refuses first with InterfaceError 'another operation is in "
        "progress'; observed here: now and then it even kills the process with SIGSEGV (or "
        "SIGABRT), since asyncpg's protocol is not made for two threads. Which of these "
        "happens varies from run to run and with the load of the machine. With psycopg "
        "both loops' queries work (the connection is tied to no loop, and the first loop "
        "is not using it meanwhile).",
        expected=on(
            asyncpg=one_of(
                {"loops": ["ok", SECOND_LOOP_FAILS], "child": one_of("exit 0", *CRASHES)},
                {"loops": [], "child": one_of(*CRASHES)},
            ),
            psycopg={"loops": ["ok", "ok"], "child": "exit 0"},
        ),
        observed={
            "loops": cases.reported.get(CONCURRENT, {}).get("results", []),
            "child": cases.ended,
        },
    )


@run.scenario
async def the_fixes(lab: Lab[Sizes]) -> None:
    """In the same child process as the pooled case: NullPool, dispose() at the end of
    each loop, and dispose(close=False) at the start of each, three loops each."""
    cases = await lab.use(loops_in_turn)
    for name, (_, claim) in FIXES.items():
        lab.check(f"fix: {name}", claim, expected=["ok", "ok", "ok"], observed=cases.results(name))


@run.scenario
async def sync_only_apis_through_run_sync(lab: Lab[Sizes]) -> None:
    """inspect() on the AsyncEngine and through run_sync; create_all and drop_all of a
    scratch table through run_sync."""
    try:
        inspect(lab.engine)
        direct = "no error"
    except NoInspectionAvailable as exc:
        direct = describe(exc)
    async with lab.engine.connect() as conn:
        tables = await conn.run_sync(lambda sync: inspect(sync).get_table_names())
    lab.check(
        "inspect() needs run_sync",
        "inspect(AsyncEngine) is refused; inspect() on the sync connection inside "
        "AsyncConnection.run_sync works and sees the migrated tables.",
        expected={
            "inspect(AsyncEngine)": prefix("NoInspectionAvailable"),
            "migrated tables seen through run_sync": ["track_points", "users"],
        },
        observed={
            "inspect(AsyncEngine)": direct,
            "migrated tables seen through run_sync": [
                t for t in ("track_points", "users") if t in tables
            ],
        },
    )

    name = f"{lab.tag.replace('-', '_')}scratch"
    scratch = Table(name, MetaData(), Column("id", Integer, primary_key=True))
    try:
        async with lab.engine.begin() as conn:
            await conn.run_sync(scratch.metadata.create_all)
            created = await conn.run_sync(lambda sync: inspect(sync).has_table(name))
    finally:
        async with lab.engine.begin() as conn:
            await conn.run_sync(scratch.metadata.drop_all)
            left = await conn.run_sync(lambda sync: inspect(sync).has_table(name))
    lab.check(
        "metadata.create_all through run_sync",
        "MetaData.create_all / drop_all are sync APIs: passed to run_sync they create and "
        "drop the table on the async connection.",
        expected={"table after create_all": True, "table after drop_all": False},
        observed={"table after create_all": created, "table after drop_all": left},
    )


@run.scenario
async def orm_events_on_sync_session(lab: Lab[Sizes]) -> None:
    """event.listen on an AsyncSession, then on its sync_session with a before_commit
    listener that runs a query; commit a user."""
    fired: list[str] = []
    async with lab.sessions() as session:
        try:
            event.listen(session, "before_commit", lambda s: fired.append("async"))
            on_async = "no error"
        except (NotImplementedError, InvalidRequestError) as exc:
            on_async = describe(exc)

        def before_commit(sync_session: Session) -> None:
            # sync-style IO is fine here: the listener runs inside the greenlet
            found = sync_session.scalar(
                select(User.id).where(User.username.startswith(lab.tag)).limit(1)
            )
            fired.append(f"before_commit saw user id {found is not None}")

        event.listen(session.sync_session, "before_commit", before_commit)
        session.add(User(username=lab.name("eventful")))
        await session.commit()
    lab.check(
        "ORM events go on sync_session",
        "Listening on the AsyncSession itself is refused (async events are not "
        "implemented); a listener on session.sync_session fires, and may even run "
        "sync-style queries, since it runs inside SQLAlchemy's greenlet.",
        expected={
            "listen on the AsyncSession": prefix("NotImplementedError"),
            "fired": ["before_commit saw user id True"],
        },
        observed={"listen on the AsyncSession": on_async, "fired": fired},
    )
