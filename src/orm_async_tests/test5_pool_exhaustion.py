"""Experiment 5: pool sizing and exhaustion.

An ``AsyncEngine`` holds at most ``pool_size + max_overflow`` connections. More
concurrent sessions than that wait ``pool_timeout`` seconds for a connection and
then fail with ``sqlalchemy.exc.TimeoutError``; an ``asyncio.Semaphore`` of the
pool's size in front of the same load makes it queue in the application instead.
The experiment counts the failures, reads the error, watches the server side in
``pg_stat_activity`` while the load runs, and checks that connections go back
to the pool (``checkedout()`` back to 0) and away from the server (``dispose``).
Then it leaves things unclosed: a session that is never closed (in this process,
under ``gc.collect()``), and an engine that is never disposed (in a child
process that exits), and records what SQLAlchemy, asyncpg and the server do.

Sources: SQLAlchemy docs, "Connection Pooling" (``QueuePool``: ``pool_size``,
``max_overflow``, ``pool_timeout``; a connection proxy that is garbage collected
is returned to the pool, but "this usage is not recommended however and in
particular is not supported with asyncio DBAPI drivers"); error reference
``3o7r`` ("QueuePool limit of size <x> overflow <y> reached, connection timed
out, timeout <z>"); asyncio docs, "Synopsis - Core" tip (invoke
``await engine.dispose()`` for an engine that goes out of scope, or "warnings
... resembling ``RuntimeError: Event loop is closed``" may appear) and "Using
multiple asyncio event loops" (dispose before reuse on another loop);
SQLAlchemy source ``pool/base.py`` ``_finalize_fairy`` (the text "The garbage
collector is trying to clean up non-checked-in connection ..., which will be
terminated", warned as ``SAWarning`` and logged at ERROR). Issue threads:
sqlalchemy/sqlalchemy#9234 ("Unclosed AsyncSession causes RuntimeError when
program exits", 2.0) and #5990 ("asyncio: RuntimeError: Event loop is closed",
1.4.0b3) report errors at exit that this experiment does not observe with
SQLAlchemy 2.1 / asyncpg 0.32 / Python 3.11; cfpb/sbl-filing-api#181 and
TensorBlock/forge#65 show the GC warning from sessions created by hand and
never closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import exc, text
from sqlalchemy.ext.asyncio import AsyncEngine

from . import probes
from .capture import captured, manual_gc
from .db import create_session_factory
from .harness import Lab, describe, experiment, first_line, run_python
from .probes import checked_out, queue_pool

GC_WARNING = "The garbage collector is trying to clean up non-checked-in connection"

# The child process of the "engine never disposed" case: it builds an engine the
# project's way (DATABASE_URL / DB_SCHEMA from its environment), runs one query
# and lets asyncio.run() end without ``await engine.dispose()``.
CHILD = """
import asyncio, os
from sqlalchemy import text
from orm_async_tests.db import create_engine, create_session_factory, resolve_target
from orm_async_tests.settings import Settings

async def main():
    settings = Settings.from_env()
    engine = create_engine(
        settings, resolve_target(settings), application_name=os.environ["OAT_CHILD_APP"]
    )
    if os.environ.get("OAT_CHILD_LEAK_SESSION"):
        session = create_session_factory(engine)()  # never closed either
        print(await session.scalar(text("SELECT pg_backend_pid()")), flush=True)
    else:
        async with engine.connect() as conn:  # the connection goes back to the pool
            print(await conn.scalar(text("SELECT pg_backend_pid()")), flush=True)
    # no: await engine.dispose()

asyncio.run(main())
"""


@dataclass
class Load:
    """What one run of concurrent sessions did, and what the server showed meanwhile."""

    finished: int = 0
    timeouts: list[exc.TimeoutError] = field(default_factory=list)
    other_errors: list[str] = field(default_factory=list)
    waited: list[float] = field(default_factory=list)
    peak_backends: int = 0
    peak_sleeping: int = 0
    peak_checked_out: int = 0
    samples: int = 0
    seconds: float = 0.0


async def run_load(
    lab: Lab,
    engine: AsyncEngine,
    app: str,
    *,
    tasks: int,
    hold: float,
    gate: asyncio.Semaphore | None,
) -> Load:
    """``tasks`` concurrent sessions, each holding a connection in ``pg_sleep(hold)``.

    A sampler counts this engine's server connections (all, and those in
    pg_sleep) through ``lab.engine`` every 50 ms while the load runs.
    """
    sessions = create_session_factory(engine)
    load = Load()
    stop = asyncio.Event()

    async def hold_one() -> None:
        async with sessions() as session:
            await session.execute(text("SELECT pg_sleep(:hold)"), {"hold": hold})

    async def one() -> None:
        started = time.perf_counter()
        try:
            if gate is None:
                await hold_one()
            else:
                async with gate:
                    await hold_one()
        except exc.TimeoutError as err:
            load.waited.append(time.perf_counter() - started)
            load.timeouts.append(err)
        except Exception as err:
            load.other_errors.append(describe(err))
        else:
            load.finished += 1

    async def sample() -> None:
        while True:
            total = await probes.backends(lab.engine, app)
            sleeping = await probes.sleepers(lab.engine, app)
            load.peak_backends = max(load.peak_backends, total)
            load.peak_sleeping = max(load.peak_sleeping, sleeping)
            load.peak_checked_out = max(load.peak_checked_out, checked_out(engine))
            load.samples += 1
            if stop.is_set():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.05)

    started = time.perf_counter()
    async with asyncio.timeout(hold * tasks + 30):  # even one at a time, it ends by then
        sampler = asyncio.create_task(sample())
        try:
            await asyncio.gather(*(one() for _ in range(tasks)))
        finally:
            stop.set()
            await sampler
    load.seconds = time.perf_counter() - started
    return load


async def settle(lab: Lab, app: str, want: int, within: float = 5.0) -> int:
    """Poll the server's count of ``app`` connections until it is ``want`` (bounded)."""
    found = await probes.poll(
        lambda: probes.backends(lab.engine, app), lambda n: n == want, within=within, every=0.05
    )
    return found.value


@experiment(5, "Pool sizing and exhaustion")
async def run(
    lab: Lab,
    *,
    tasks: int = 6,
    pool_size: int = 2,
    max_overflow: int = 1,
    pool_timeout: float = 0.5,
    hold: float = 1.0,
) -> None:
    """What happens when more sessions run at once than pool_size + max_overflow, how
    many server connections exist at the peak, do connections come back after each
    session, and what happens to a session never closed and an engine never disposed?"""
    if hold <= pool_timeout:
        raise ValueError("hold must exceed pool_timeout, or waiting sessions get a connection")
    children = asyncio.create_task(never_disposed(lab))  # child processes run meanwhile
    try:
        await exhaust_and_bound(
            lab,
            tasks=tasks,
            hold=hold,
            pool_size=pool_size,
            max_overflow=max_overflow,
            pool_timeout=pool_timeout,
        )
        await never_closed(lab, pool_timeout=pool_timeout)
        await children
    finally:
        if not children.done():
            children.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await children


async def exhaust_and_bound(
    lab: Lab,
    *,
    tasks: int,
    hold: float,
    pool_size: int,
    max_overflow: int,
    pool_timeout: float,
) -> None:
    limit = pool_size + max_overflow
    sizes: dict[str, Any] = {
        "pool_size": pool_size,
        "max_overflow": max_overflow,
        "pool_timeout": pool_timeout,
    }
    exhausted_app = f"{lab.tag}exhaust"
    exhausted = lab.engine_with(application_name=exhausted_app, **sizes)
    flood = await run_load(lab, exhausted, exhausted_app, tasks=tasks, hold=hold, gate=None)

    predicted = max(0, tasks - limit)
    lab.check(
        "more sessions than the pool: the extra ones time out",
        f"{tasks} sessions at once on pool_size={pool_size}, max_overflow={max_overflow}: "
        f"{limit} get a connection, the other {predicted} wait pool_timeout={pool_timeout} s "
        "(shorter than the hold) and fail with sqlalchemy.exc.TimeoutError.",
        expected=f"{predicted} TimeoutError, {min(tasks, limit)} finished, no other error",
        observed=f"{len(flood.timeouts)} TimeoutError, {flood.finished} finished, "
        f"other errors: {'; '.join(flood.other_errors) or 'none'}",
        passed=len(flood.timeouts) == predicted
        and flood.finished == min(tasks, limit)
        and not flood.other_errors,
    )
    documented = (
        f"QueuePool limit of size {pool_size} overflow {max_overflow} reached, "
        f"connection timed out, timeout {pool_timeout:.2f}"
    )
    messages = sorted({first_line(e) for e in flood.timeouts})
    codes = sorted({str(e.code) for e in flood.timeouts})
    lab.check(
        "the TimeoutError message (error 3o7r)",
        "The error names the pool's size, its overflow and the timeout, in the form of "
        "SQLAlchemy's error reference 3o7r, and carries that code.",
        expected=f"[{documented!r}] code ['3o7r']",
        observed=f"{messages} code {codes}",
        passed=messages == [documented] and codes == ["3o7r"],
    )
    lab.check(
        "peak server connections = pool_size + max_overflow",
        "While the pool is exhausted the server shows exactly pool_size + max_overflow "
        "connections for this engine, all in pg_sleep, never more (pg_stat_activity, "
        f"sampled every 50 ms: {flood.samples} samples).",
        expected=f"{limit} connections, {limit} in pg_sleep, {limit} checked out",
        observed=f"{flood.peak_backends} connections, {flood.peak_sleeping} in pg_sleep, "
        f"{flood.peak_checked_out} checked out",
        passed=flood.peak_backends == flood.peak_sleeping == flood.peak_checked_out == limit,
    )

    bounded_app = f"{lab.tag}bounded"
    bounded = lab.engine_with(application_name=bounded_app, **sizes)
    gated = await run_load(
        lab, bounded, bounded_app, tasks=tasks, hold=hold, gate=asyncio.Semaphore(limit)
    )
    lab.check(
        "a Semaphore(pool_size + max_overflow) makes the same load finish",
        f"The same {tasks} sessions behind asyncio.Semaphore({limit}) wait in the "
        "application, not in the pool: all finish, no TimeoutError, and the server never "
        f"sees more than {limit} connections.",
        expected=f"{tasks} finished, 0 errors, peak {limit} connections",
        observed=f"{gated.finished} finished, {len(gated.timeouts) + len(gated.other_errors)} "
        f"errors, peak {gated.peak_backends} connections ({gated.peak_sleeping} in pg_sleep)",
        passed=gated.finished == tasks
        and not gated.timeouts
        and not gated.other_errors
        and gated.peak_backends == limit,
    )

    lab.check(
        "connections are back after every session closed",
        "`async with session` returns its connection on exit, including after a "
        "TimeoutError: with every session closed, pool.checkedout() is 0 on both engines.",
        expected="exhausted engine: 0 checked out; bounded engine: 0 checked out",
        observed=f"exhausted engine: {queue_pool(exhausted).status()}; "
        f"bounded engine: {queue_pool(bounded).status()}",
        passed=checked_out(exhausted) == 0 and checked_out(bounded) == 0,
    )
    kept = await settle(lab, exhausted_app, pool_size)
    await exhausted.dispose()
    after_dispose = await settle(lab, exhausted_app, 0)
    await bounded.dispose()
    lab.check(
        "idle connections stay open until dispose()",
        "After the load the pool closes its overflow connections on return and keeps "
        "pool_size connections open on the server; only dispose() closes those.",
        expected=f"{pool_size} server connections after the load, 0 after dispose()",
        observed=f"{kept} after the load, {after_dispose} after dispose()",
        passed=kept == pool_size and after_dispose == 0,
    )
    lab.figure("exhausted load, wall time", flood.seconds, "s")
    if flood.waited:
        lab.figure("mean wait before TimeoutError", sum(flood.waited) / len(flood.waited), "s")
    lab.figure("bounded load, wall time", gated.seconds, "s")
    lab.figure("pg_stat_activity samples (both loads)", flood.samples + gated.samples, "samples")


async def leak_a_session(engine: AsyncEngine) -> tuple[int, str]:
    """Open a session, run a query (it now holds a connection), drop it without close.

    Returns the server pid and the repr of the driver connection it held.
    """
    session = create_session_factory(engine)()
    pid = await session.scalar(text("SELECT pg_backend_pid()"))
    raw = await (await session.connection()).get_raw_connection()
    return int(pid or 0), repr(raw.dbapi_connection)


def masked(message: str) -> str:
    return re.sub(r"0x[0-9a-f]+", "0x…", message)


async def never_closed(lab: Lab, *, pool_timeout: float) -> None:
    app = f"{lab.tag}gc"
    engine = lab.engine_with(
        application_name=app, pool_size=1, max_overflow=0, pool_timeout=pool_timeout
    )
    gc.collect()  # garbage from before is not ours: collected outside the capture below
    with captured(level=logging.DEBUG, collect=False) as got:
        caught = got.caught
        with manual_gc():  # from here on, only our gc.collect() collects
            pid, raw = await leak_a_session(engine)
            ours_before = [w for w in caught if raw in str(w.message)]
            held_before = checked_out(engine)
            server_before = await probes.backends(lab.engine, app)
            gc.collect()
            ours = [w for w in caught if raw in str(w.message)]
            held_after = checked_out(engine)
    others = [w for w in caught if raw not in str(w.message)]
    if others:
        lab.note(
            "other warnings caught during the gc.collect(): "
            + "; ".join(f"{w.category.__name__}: {masked(str(w.message))}" for w in others)
        )
    server_after = await settle(lab, app, 0)
    async with create_session_factory(engine)() as session:
        new_pid = int(await session.scalar(text("SELECT pg_backend_pid()")) or 0)
    await engine.dispose()

    lab.check(
        "a session never closed keeps its connection until the GC runs",
        "An AsyncSession dropped without close() is not freed by reference counting "
        "(the session's objects form cycles): its connection stays checked out and open "
        "on the server, with no warning yet.",
        expected="1 checked out, 1 server connection, 0 warnings",
        observed=f"{held_before} checked out, {server_before} server connection, "
        f"{len(ours_before)} warnings",
        passed=held_before == 1 and server_before == 1 and not ours_before,
    )
    shown = [f"{w.category.__name__}: {masked(str(w.message))}" for w in ours]
    logged = [
        f"{r.levelname} on {r.name}"
        for r in got.records
        if raw in r.getMessage() and GC_WARNING in r.getMessage()
    ]
    lab.check(
        "gc.collect() warns: SAWarning 'non-checked-in connection ... will be terminated'",
        "The garbage collector's cleanup of that session emits one SAWarning naming the "
        "asyncpg connection, which is terminated (not returned to the pool: no IO is "
        "possible in a finalizer), and logs the same text at ERROR on the pool's logger.",
        expected=f"1 SAWarning starting {GC_WARNING!r} with 'which will be terminated'; "
        "logged at ERROR",
        observed=f"{shown or 'no warning'}; logged: {logged or 'no'}",
        passed=len(ours) == 1
        and ours[0].category is exc.SAWarning
        and str(ours[0].message).startswith(GC_WARNING)
        and "which will be terminated" in str(ours[0].message)
        and any(item.startswith("ERROR") for item in logged),
    )
    lab.check(
        "the GC cleanup frees the pool slot and ends the server connection",
        "After the GC cleanup the pool counts 0 checked out, the server connection is "
        "gone, and the next session (on a pool of 1) gets a new server connection "
        "instead of a TimeoutError.",
        expected=f"0 checked out, 0 server connections, next session on a pid other than {pid}",
        observed=f"{held_after} checked out, {server_after} server connections, next session "
        f"on pid {new_pid}",
        passed=held_after == 0 and server_after == 0 and new_pid not in (0, pid),
    )


@dataclass
class Child:
    variant: str
    returncode: int | None
    pid: int | None
    stderr: str
    seconds: float
    server_after: int = -1

    def complaints(self) -> list[str]:
        """The distinct warnings/errors on stderr, object addresses and fds masked."""
        found: list[str] = []
        for category, message in re.findall(r"(\w+(?:Warning|Error)): ([^\n]*)", self.stderr):
            if message.startswith("Enable tracemalloc"):
                continue
            message = re.sub(r"<([\w.]+)[^<>]*(?:<[^<>]*>)?[^<>]*>", r"<\1>", message)
            item = f"{category}: {message.split(';')[0].strip()}"
            if item not in found:
                found.append(item)
        return found

    def quiet(self) -> bool:
        """Exit 0; nothing on stderr but ResourceWarnings (which Python hides by default)."""
        items = self.complaints()
        return (
            self.returncode == 0
            and "Traceback" not in self.stderr
            and "Event loop is closed" not in self.stderr
            and all(item.startswith("ResourceWarning: ") for item in items)
        )

    def shown(self) -> str:
        items = self.complaints()
        return (
            f"{self.variant}: exit {self.returncode}, "
            f"stderr: {'; '.join(items) if items else 'empty'}"
        )


async def run_child(lab: Lab, variant: str, app: str, *, leak_session: bool) -> Child:
    env: dict[str, str | None] = {
        key: None  # Python's and the embedded server's knobs: the child runs on plain defaults
        for key in ("PYTHONWARNINGS", "PYTHONDEVMODE", "PYTHONASYNCIODEBUG", "EMBEDDED_PGDATA")
    }
    env["OAT_CHILD_APP"] = app
    if leak_session:
        env["OAT_CHILD_LEAK_SESSION"] = "1"
    started = time.perf_counter()
    # -W default::ResourceWarning shows what Python's default filters would hide
    done = await run_python(
        lab, CHILD, within=60, options=("-W", "default::ResourceWarning"), extra_env=env
    )
    printed = done.stdout.split()
    child = Child(
        variant,
        done.returncode,
        int(printed[0]) if printed and printed[0].isdigit() else None,
        done.stderr,
        time.perf_counter() - started,
    )
    child.server_after = await settle(lab, app, 0)
    return child


async def never_disposed(lab: Lab) -> None:
    pooled, leaked = await asyncio.gather(
        run_child(lab, "engine not disposed", f"{lab.tag}child-pool", leak_session=False),
        run_child(
            lab,
            "engine not disposed, session not closed",
            f"{lab.tag}child-session",
            leak_session=True,
        ),
    )
    both = (pooled, leaked)
    lab.check(
        "an engine never disposed: the process exits quietly",
        "Observed, not what the asyncio docs' dispose() tip and issues #5990/#9234 describe "
        "('RuntimeError: Event loop is closed' within garbage collection): a child that "
        "ends asyncio.run() without await engine.dispose() (with its connection pooled, "
        "or still held by an unclosed session) exits 0 with no error or SAWarning; the "
        "only complaints are ResourceWarnings for the unclosed asyncpg connection, "
        "transport and socket, which Python's default warning filters hide.",
        expected="exit 0; only ResourceWarning lines (at least one 'unclosed'), for both",
        observed=" | ".join(c.shown() for c in both),
        passed=all(c.quiet() and any("unclosed" in item for item in c.complaints()) for c in both),
    )
    lab.check(
        "the server connection ends with the child process",
        "The server-side connection of a never-disposed engine does not outlive the "
        "process: when it exits the OS closes the socket and the backend goes away.",
        expected="backend pid printed by each child; 0 connections after exit",
        observed="; ".join(
            f"{c.variant}: pid {c.pid}, {c.server_after} connections after exit" for c in both
        ),
        passed=all(c.pid is not None and c.server_after == 0 for c in both),
    )
    for c in both:
        lab.figure(f"child process ({c.variant})", c.seconds, "s")
