"""Experiment 12: event loops, sync-only APIs and ORM events in async code.

An ``AsyncEngine``'s pooled connections belong to the event loop that opened
them. A test suite that keeps one engine while pytest-asyncio gives each test
a new loop (its default ``loop_scope="function"``) reuses a connection from a
dead or foreign loop. The cross-loop cases run in a child process: what they
leave behind (unawaited coroutines, "Future exception was never retrieved",
pool error logs) must not leak into this process.

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
import json
import logging
import re
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from sqlalchemy import Column, Integer, MetaData, Table, event, inspect, select, text
from sqlalchemy.exc import InvalidRequestError, NoInspectionAvailable
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from .capture import captured
from .db import open_database
from .harness import Lab, describe, experiment, run_python
from .models import User


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


def scenario(name: str, steps: Callable[[], list[str]]) -> dict[str, Any]:
    """Run one case; with what SQLAlchemy logged at ERROR (e.g. "Exception terminating
    connection") and what was warned, garbage collection included."""
    with captured("sqlalchemy", logging.ERROR) as noise:
        results = steps()
    return {
        "case": name,
        "results": results,
        "logged_errors": [message.split("\n")[0] for message in noise.logged],
        "warnings": noise.warning_lines(),
    }


def pooled_sequential() -> list[str]:
    db = open_database(pool_size=1, max_overflow=0)
    return [in_new_loop(lambda: one_query(db.engine)) for _ in range(3)]


def pooled_concurrent() -> list[str]:
    db = open_database(pool_size=1, max_overflow=0)

    async def main() -> list[str]:
        await one_query(db.engine)  # the pooled connection now belongs to this loop
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


CASES: dict[str, Callable[[], list[str]]] = {
    "pooled, loops one after another": pooled_sequential,
    "pooled, second loop while the first runs": pooled_concurrent,
    "NullPool": nullpool,
    "dispose() at the end of each loop": dispose_each_loop,
    "dispose(close=False) at the start of each loop": dispose_no_close,
}
ALONE = "pooled, second loop while the first runs"  # may crash its process: run it apart


def child(names: list[str]) -> None:
    """Run the named cases, one JSON line each (the cases use several event loops in turn)."""
    logging.getLogger("sqlalchemy").propagate = False
    for name in names:
        print(json.dumps(scenario(name, CASES[name])), flush=True)


async def run_child(lab: Lab, names: list[str], limit_seconds: float) -> dict[str, dict[str, Any]]:
    """Run ``names`` in a child process; a case that did not report says how the child ended."""
    code = f"from {__name__} import child; child({names!r})"
    done = await run_python(lab, code, within=limit_seconds)
    cases: dict[str, dict[str, Any]] = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            found = json.loads(line)
            cases[found["case"]] = found
    ended = (
        f"child process killed by signal {-done.returncode}"
        if done.returncode < 0
        else f"child process exited with {done.returncode}"
    )
    for name in names:
        cases.setdefault(name, {"case": name, "results": [ended]})
        cases[name]["stderr_lines"] = len(done.stderr.strip().splitlines())
    return cases


# ---------------------------------------------------------------- the experiment
@experiment(12, "Event loops, run_sync and ORM events")
async def run(lab: Lab, *, child_timeout: float = 60.0) -> None:
    """What happens to a pooled engine used from a second event loop (the pytest-asyncio
    pitfall), which fixes work, and how do sync-only APIs and ORM events work with
    AsyncEngine / AsyncSession?"""
    cases = await run_child(lab, [n for n in CASES if n != ALONE], child_timeout)
    cases.update(await run_child(lab, [ALONE], child_timeout))

    def results(name: str) -> list[str]:
        return list(cases.get(name, {}).get("results", ["case did not run"]))

    sequential = results("pooled, loops one after another")
    lab.check(
        "pooled engine, next loop: first use fails",
        "A connection pooled by a finished event loop fails when a new loop checks it out "
        "(its transport belongs to the closed loop): the first query in the second loop "
        "raises; the pool then discards that connection and the third loop works.",
        expected="loop 1 ok; loop 2 RuntimeError (different loop / loop closed); loop 3 ok",
        observed="; ".join(f"loop {i}: {r}" for i, r in enumerate(sequential, 1)),
        passed=len(sequential) == 3
        and sequential[0] == "ok"
        and sequential[1].startswith("RuntimeError")
        and sequential[2] == "ok",
    )
    concurrent = results(ALONE)
    lab.check(
        "pooled engine, concurrent second loop fails",
        "Using the engine from another thread's loop while the first loop still runs "
        "fails the same way (the pooled connection is attached to the first loop); "
        "observed here: now and then it even kills the process with SIGSEGV (about 1 run "
        "in 12), since asyncpg's protocol is not made for two threads.",
        expected="first loop ok, second loop RuntimeError; or the process killed by a signal",
        observed="; ".join(concurrent),
        passed=(
            concurrent[:1] == ["ok"]
            and concurrent[1:2] != []
            and concurrent[1].startswith("RuntimeError")
        )
        or concurrent[0].startswith("child process killed by signal"),
    )
    noise = cases.get("pooled, loops one after another", {})
    lab.note(
        "Beside the exception, the failed cross-loop checkout makes SQLAlchemy log "
        f"{len(noise.get('logged_errors', []))} error record(s) such as "
        f"{(noise.get('logged_errors') or ['(none)'])[0]!r}, and the child process printed "
        f"{noise.get('stderr_lines', 0)} line(s) on stderr (e.g. 'Future exception was never "
        "retrieved', 'coroutine ... was never awaited'): the noise a test suite shows."
    )
    for name, claim in [
        (
            "NullPool",
            "With NullPool every checkout opens a new connection in the current loop, "
            "so three loops in turn all work.",
        ),
        (
            "dispose() at the end of each loop",
            "Disposing the engine at the end of each loop "
            "(in that loop) leaves nothing for the next loop: three loops all work.",
        ),
        (
            "dispose(close=False) at the start of each loop",
            "dispose(close=False) at the start "
            "of a new loop drops the old loop's connections without touching them: all work.",
        ),
    ]:
        got = results(name)
        lab.check(
            f"fix: {name}",
            claim,
            expected="ok; ok; ok",
            observed="; ".join(got),
            passed=got == ["ok", "ok", "ok"],
        )

    await sync_only_apis(lab)
    await orm_events(lab)


async def sync_only_apis(lab: Lab) -> None:
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
        expected="NoInspectionAvailable; tables include users, track_points",
        observed=f"{direct.split(':')[0]}; tables: {', '.join(sorted(tables))}",
        passed=direct.startswith("NoInspectionAvailable")
        and {"users", "track_points"} <= set(tables),
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
            gone = not await conn.run_sync(lambda sync: inspect(sync).has_table(name))
    lab.check(
        "metadata.create_all through run_sync",
        "MetaData.create_all / drop_all are sync APIs: passed to run_sync they create and "
        "drop the table on the async connection.",
        expected="created, then dropped",
        observed=f"created: {created}; dropped: {gone}",
        passed=created and gone,
    )


async def orm_events(lab: Lab) -> None:
    fired: list[str] = []
    async with lab.sessions() as session:
        try:
            event.listen(session, "before_commit", lambda s: fired.append("async"))
            on_async = "no error"
        except (NotImplementedError, InvalidRequestError) as exc:
            on_async = describe(exc)

        def before_commit(sync_session: Session) -> None:
            # sync-style IO is fine here: the listener runs inside the greenlet
            count = sync_session.scalar(
                select(User.id).where(User.username.startswith(lab.tag)).limit(1)
            )
            fired.append(f"before_commit saw user id {count is not None}")

        event.listen(session.sync_session, "before_commit", before_commit)
        session.add(User(username=f"{lab.tag}eventful"))
        await session.commit()
    lab.check(
        "ORM events go on sync_session",
        "Listening on the AsyncSession itself is refused (async events are not "
        "implemented); a listener on session.sync_session fires, and may even run "
        "sync-style queries, since it runs inside SQLAlchemy's greenlet.",
        expected="NotImplementedError; before_commit fired and its query worked",
        observed=f"{on_async.split(':')[0]}; fired: {fired or 'nothing'}",
        passed=on_async.startswith("NotImplementedError")
        and fired == ["before_commit saw user id True"],
    )
