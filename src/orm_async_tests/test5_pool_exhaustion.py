"""What happens when more sessions run at once than pool_size + max_overflow, how
many server connections exist at the peak, do connections come back after each
session, and what happens to a session never closed and an engine never disposed?

An ``AsyncEngine`` holds at most ``pool_size + max_overflow`` connections. More
concurrent sessions than that wait ``pool_timeout`` seconds for a connection and
then fail with ``sqlalchemy.exc.TimeoutError``; an ``asyncio.Semaphore`` of the
pool's size in front of the same load makes it queue in the application instead.
The experiment counts the failures, reads the error, watches the server side in
``pg_stat_activity`` while the load runs, and checks that connections go back
to the pool (``checkedout()`` back to 0) and away from the server (``dispose``).
Then it leaves things unclosed: a session that is never closed (in this process,
under ``gc.collect()``), and an engine that is never disposed (in a child
process that exits), and records what SQLAlchemy, the driver and the server do.

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
terminated", or "which will be dropped, as it cannot be safely terminated" for
a dialect without ``has_terminate``, such as psycopg's; warned as ``SAWarning``
and logged at ERROR). In 2.1 the checked-out connection's finalizer is a
``weakref.finalize`` (run once at exit, where it finds the connection still
referenced and does nothing); in 2.0 it is a ``weakref.ref`` callback, which
runs when interpreter shutdown finally collects an unclosed session. Issue
threads: sqlalchemy/sqlalchemy#9234 ("Unclosed AsyncSession causes RuntimeError
when program exits", 2.0) and #5990 ("asyncio: RuntimeError: Event loop is
closed", 1.4.0b3) report errors at exit: this experiment observes one with
SQLAlchemy 2.0 and asyncpg ("RuntimeError: greenlet is being finalized"), none
with 2.1; cfpb/sbl-filing-api#181 and TensorBlock/forge#65 show the GC warning
from sessions created by hand and never closed.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import exc, text
from sqlalchemy.ext.asyncio import AsyncEngine

from .db import create_engine, create_session_factory, resolve_target
from .lab import (
    BadSizes,
    Lab,
    at_least,
    capture,
    child,
    contains,
    describe,
    each,
    experiment,
    first_line,
    matches,
    not_,
    on,
    one_of,
    prefix,
    probes,
)
from .settings import Settings

GC_WARNING = "The garbage collector is trying to clean up non-checked-in connection"
SETTLE = 5.0
"""Seconds the server may take to show the connection count a step leads to."""
SAMPLE_EVERY = 0.05
"""Seconds between two pg_stat_activity samples while a load runs."""


@dataclass(frozen=True)
class Sizes:
    tasks: int = 6
    """Sessions started at once."""
    pool_size: int = 2
    """pool_size of the engines under load."""
    max_overflow: int = 1
    """max_overflow of the engines under load."""
    pool_timeout: float = 0.25
    """Seconds a session waits for a connection before TimeoutError."""
    hold: float = 0.5
    """Seconds each session holds its connection (in pg_sleep)."""

    def __post_init__(self) -> None:
        if self.tasks <= self.pool_size + self.max_overflow:
            raise BadSizes(
                f"tasks ({self.tasks}) must be more than pool_size + max_overflow "
                f"({self.pool_size + self.max_overflow}): else the pool never runs out"
            )
        if self.hold <= self.pool_timeout:
            raise BadSizes(
                f"hold ({self.hold}) must exceed pool_timeout ({self.pool_timeout}), "
                "or waiting sessions get a connection"
            )


run = experiment(5, "Pool sizing and exhaustion", Sizes)


# ---------------------------------------------------------------------------------------------
# the load: concurrent sessions, each holding a connection in pg_sleep


@dataclass
class Load:
    """What one run of concurrent sessions did, and what the server showed meanwhile."""

    finished: int = 0
    timeouts: list[exc.TimeoutError] = field(default_factory=list)
    other_errors: list[str] = field(default_factory=list)
    waited: list[float] = field(default_factory=list)
    samples: list[dict[str, int]] = field(default_factory=list)
    """Each sample: this engine's server connections, those in pg_sleep, its checked out."""
    seconds: float = 0.0

    def peak(self, key: str) -> int:
        return probes.peak([s[key] for s in self.samples])

    def samples_under_load(self) -> int:
        """Samples that saw at least one session in pg_sleep."""
        return sum(s["in pg_sleep"] > 0 for s in self.samples)


def pool_options(lab: Lab[Sizes]) -> dict[str, float]:
    return {
        "pool_size": lab.sizes.pool_size,
        "max_overflow": lab.sizes.max_overflow,
        "pool_timeout": lab.sizes.pool_timeout,
    }


async def run_load(
    lab: Lab[Sizes], engine: AsyncEngine, app: str, gate: asyncio.Semaphore | None
) -> Load:
    """``tasks`` concurrent sessions, each holding a connection in ``pg_sleep(hold)``,
    while a sampler counts ``app``'s server connections (all, and those in pg_sleep,
    through ``lab.engine``) and the engine's checked-out connections."""
    tasks, hold = lab.sizes.tasks, lab.sizes.hold
    sessions = lab.sessions_on(engine)
    load = Load()

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

    async def sample() -> dict[str, int]:
        return {
            "connections": await probes.backends(lab.engine, app),
            "in pg_sleep": await probes.sleepers(lab.engine, app),
            "checked out": probes.checked_out(engine),
        }

    bound = hold * tasks + 30  # even one at a time, it ends by then
    started = time.perf_counter()
    async with (
        asyncio.timeout(bound),
        probes.Sampler(sample, every=SAMPLE_EVERY, within=bound) as seen,
    ):
        await asyncio.gather(*(one() for _ in range(tasks)))
    load.seconds = time.perf_counter() - started
    load.samples = seen.samples
    return load


@run.scenario
async def more_sessions_than_the_pool(lab: Lab[Sizes]) -> None:
    """``tasks`` sessions at once, each holding its connection ``hold`` seconds, on an
    engine of pool_size + max_overflow connections; pg_stat_activity sampled meanwhile;
    then the pool after the load, and after dispose()."""
    size = lab.sizes
    limit = size.pool_size + size.max_overflow
    app = lab.name("exhaust")
    engine = lab.engine_with(application_name=app, **pool_options(lab))
    flood = await run_load(lab, engine, app, gate=None)

    predicted = size.tasks - limit
    lab.check(
        "more sessions than the pool: the extra ones time out",
        f"{size.tasks} sessions at once on pool_size={size.pool_size}, "
        f"max_overflow={size.max_overflow}: {limit} get a connection, the other {predicted} "
        f"wait pool_timeout={size.pool_timeout} s (shorter than the hold) and fail with "
        "sqlalchemy.exc.TimeoutError.",
        expected={
            "TimeoutError": predicted,
            "finished": min(size.tasks, limit),
            "other errors": [],
        },
        observed={
            "TimeoutError": len(flood.timeouts),
            "finished": flood.finished,
            "other errors": flood.other_errors,
        },
    )
    documented = (
        f"QueuePool limit of size {size.pool_size} overflow {size.max_overflow} reached, "
        f"connection timed out, timeout {size.pool_timeout:.2f}"
    )
    lab.check(
        "the TimeoutError message (error 3o7r)",
        "The error names the pool's size, its overflow and the timeout, in the form of "
        "SQLAlchemy's error reference 3o7r, and carries that code.",
        expected={"messages": [documented], "codes": ["3o7r"]},
        observed={
            "messages": sorted({first_line(e) for e in flood.timeouts}),
            "codes": sorted({str(e.code) for e in flood.timeouts}),
        },
    )
    lab.check(
        "peak server connections = pool_size + max_overflow",
        "While the pool is exhausted the server shows exactly pool_size + max_overflow "
        "connections for this engine, all in pg_sleep, never more (pg_stat_activity, "
        f"sampled every {SAMPLE_EVERY * 1000:.0f} ms while the load runs).",
        expected={
            "peak connections": limit,
            "peak in pg_sleep": limit,
            "peak checked out": limit,
            "samples that saw the load": at_least(1),
        },
        observed={
            "peak connections": flood.peak("connections"),
            "peak in pg_sleep": flood.peak("in pg_sleep"),
            "peak checked out": flood.peak("checked out"),
            "samples that saw the load": flood.samples_under_load(),
        },
    )
    lab.check(
        "connections are back after every session closed",
        "`async with session` returns its connection on exit, including after a "
        "TimeoutError: with every session closed, pool.checkedout() is 0.",
        expected={"checked out": 0},
        observed={"checked out": probes.checked_out(engine)},
    )
    lab.note(f"the pool after the load: {probes.queue_pool(engine).status()}")
    kept = await probes.settle(lab.engine, app, size.pool_size, within=SETTLE)
    await engine.dispose()
    lab.check(
        "idle connections stay open until dispose()",
        "After the load the pool closes its overflow connections on return and keeps "
        "pool_size connections open on the server; only dispose() closes those.",
        expected={"server connections after the load": size.pool_size, "after dispose()": 0},
        observed={
            "server connections after the load": kept,
            "after dispose()": await probes.settle(lab.engine, app, 0, within=SETTLE),
        },
    )
    lab.figure("exhausted load, wall time", flood.seconds, "s")
    if flood.waited:
        lab.figure("mean wait before TimeoutError", sum(flood.waited) / len(flood.waited), "s")
    lab.figure("pg_stat_activity samples", len(flood.samples), "samples")


@run.scenario
async def a_semaphore_in_front(lab: Lab[Sizes]) -> None:
    """The same load on a fresh engine of the same sizes, behind an
    asyncio.Semaphore(pool_size + max_overflow)."""
    size = lab.sizes
    limit = size.pool_size + size.max_overflow
    app = lab.name("bounded")
    engine = lab.engine_with(application_name=app, **pool_options(lab))
    gated = await run_load(lab, engine, app, gate=asyncio.Semaphore(limit))
    lab.check(
        "a Semaphore(pool_size + max_overflow) makes the same load finish",
        f"The same {size.tasks} sessions behind asyncio.Semaphore({limit}) wait in the "
        "application, not in the pool: all finish, no TimeoutError, the server never "
        f"sees more than {limit} connections, and every connection is back in the pool "
        "afterwards.",
        expected={
            "finished": size.tasks,
            "TimeoutError": 0,
            "other errors": [],
            "peak connections": limit,
            "peak in pg_sleep": limit,
            "checked out after the load": 0,
        },
        observed={
            "finished": gated.finished,
            "TimeoutError": len(gated.timeouts),
            "other errors": gated.other_errors,
            "peak connections": gated.peak("connections"),
            "peak in pg_sleep": gated.peak("in pg_sleep"),
            "checked out after the load": probes.checked_out(engine),
        },
    )
    lab.figure("bounded load, wall time", gated.seconds, "s")
    lab.figure("pg_stat_activity samples", len(gated.samples), "samples")


# ---------------------------------------------------------------------------------------------
# a session never closed (this process, gc.collect())


async def leak_a_session(lab: Lab[Sizes], engine: AsyncEngine) -> tuple[int, str, Any]:
    """Open a session, run a query (it now holds a connection), drop it without close.

    Returns the server pid, the repr of the adapted connection it held and the driver's
    connection itself (asyncpg's ``Connection``, psycopg's ``AsyncConnection``).
    """
    session = lab.sessions_on(engine)()
    pid = await session.scalar(text("SELECT pg_backend_pid()"))
    raw = await (await session.connection()).get_raw_connection()
    return int(pid or 0), repr(raw.dbapi_connection), raw.driver_connection


def driver_closed(driver: Any) -> bool:
    """Whether the driver's own connection is closed (asyncpg ``is_closed()``, psycopg
    ``closed``)."""
    closed = driver.is_closed() if hasattr(driver, "is_closed") else driver.closed
    return bool(closed)


def masked(message: str) -> str:
    return re.sub(r"0x[0-9a-f]+", "0x…", message)


def lines(found: list[warnings.WarningMessage]) -> list[str]:
    """``"SAWarning: message"`` of each warning, object addresses masked."""
    return [f"{w.category.__name__}: {masked(str(w.message))}" for w in found]


@run.scenario
async def a_session_never_closed(lab: Lab[Sizes]) -> None:
    """On a pool of one, a session runs a query and is dropped without close(); with
    automatic garbage collection off, the pool and the server are read before and after
    an explicit gc.collect(), with warnings and the pool's log recorded; then the next
    session on that pool."""
    app = lab.name("gc")
    engine = lab.one_connection(application_name=app, pool_timeout=lab.sizes.pool_timeout)
    with capture.captured(level=logging.DEBUG, collect=False) as got:
        caught = got.caught
        with capture.manual_gc():  # from here on, only our gc.collect() collects
            pid, raw, driver = await leak_a_session(lab, engine)
            ours_before = [w for w in caught if raw in str(w.message)]
            held_before = probes.checked_out(engine)
            server_before = await probes.backends(lab.engine, app)
            gc.collect()
            ours = [w for w in caught if raw in str(w.message)]
            held_after = probes.checked_out(engine)
            closed_by_cleanup = driver_closed(driver)
    others = [w for w in caught if raw not in str(w.message)]
    if others:
        lab.note("other warnings caught during the gc.collect(): " + "; ".join(lines(others)))
    logged = [
        f"{r.levelname} on {r.name}"
        for r in got.records
        if raw in r.getMessage() and GC_WARNING in r.getMessage()
    ]
    # A connection the GC cleanup dropped without closing it (psycopg) stays open as long
    # as anything references it: here this experiment (``driver``), the pool's DEBUG log
    # records (their args hold it) and whatever else captures logs (pytest does).
    server_after = await probes.settle(lab.engine, app, 0, within=SETTLE)
    if not driver_closed(driver):
        await driver.close()  # ours to close: no server connection, no __del__ warning left
    got.records.clear()
    async with lab.sessions_on(engine)() as session:
        new_pid = int(await session.scalar(text("SELECT pg_backend_pid()")) or 0)

    lab.check(
        "a session never closed keeps its connection until the GC runs",
        "An AsyncSession dropped without close() is not freed by reference counting "
        "(the session's objects form cycles): its connection stays checked out and open "
        "on the server, with no warning yet.",
        expected={"checked out": 1, "server connections": 1, "warnings": []},
        observed={
            "checked out": held_before,
            "server connections": server_before,
            "warnings": lines(ours_before),
        },
    )
    lab.check(
        "gc.collect() warns: SAWarning 'non-checked-in connection'",
        "The garbage collector's cleanup of that session emits one SAWarning naming the "
        "driver connection, which is not returned to the pool (no IO is possible in a "
        "finalizer), and logs the same text at ERROR on the pool's logger. asyncpg: the "
        "dialect has terminate() (it closes the socket without IO), so the connection 'will "
        "be terminated'. psycopg: the dialect has no terminate (has_terminate is False), so "
        "the connection 'will be dropped, as it cannot be safely terminated': SQLAlchemy "
        "leaves it open and forgets it.",
        expected={
            "warnings": [prefix(f"SAWarning: {GC_WARNING}")],
            "of which say": on(
                asyncpg=each(contains("which will be terminated")),
                psycopg=each(contains("which will be dropped, as it cannot be safely terminated")),
            ),
            "logged": [prefix("ERROR on sqlalchemy.pool")],
        },
        observed={"warnings": lines(ours), "of which say": lines(ours), "logged": logged},
    )
    lab.check(
        "the GC cleanup frees the pool slot; only asyncpg's connection is closed",
        "After the GC cleanup the pool counts 0 checked out and the next session (on a "
        "pool of 1) gets a new server connection instead of a TimeoutError. What happens "
        "to the old one differs by driver. asyncpg: the cleanup terminated it, so its server "
        "connection is gone. psycopg: the cleanup dropped it without closing it, so it stays "
        "open on the server for as long as anything references the psycopg connection "
        "(here: this experiment; in an application, say, a log record of the pool holding "
        "it in its args); when the last reference goes, psycopg's __del__ warns "
        "ResourceWarning 'deleted while still open' and closes the socket.",
        expected={
            "checked out": 0,
            "driver connection closed by the cleanup": on(asyncpg=True, psycopg=False),
            "server connections (while referenced)": on(asyncpg=0, psycopg=1),
            "next session's backend pid": not_(one_of(0, pid)),
        },
        observed={
            "checked out": held_after,
            "driver connection closed by the cleanup": closed_by_cleanup,
            "server connections (while referenced)": server_after,
            "next session's backend pid": new_pid,
        },
    )


# ---------------------------------------------------------------------------------------------
# an engine never disposed (a child process that exits)

CHILD_ENV: dict[str, str | None] = {
    key: None  # Python's and the embedded server's knobs: the child runs on plain defaults
    for key in ("PYTHONWARNINGS", "PYTHONDEVMODE", "PYTHONASYNCIODEBUG", "EMBEDDED_PGDATA")
}


async def leave_the_engine(app: str, leak_session: bool) -> int:
    """In a child process: build an engine the project's way (DATABASE_URL / DB_SCHEMA from
    the environment), run one query (on a connection that goes back to the pool, or on a
    session never closed), return the backend pid, and let asyncio.run() end without
    ``await engine.dispose()``."""
    settings = Settings.from_env()
    engine = create_engine(settings, resolve_target(settings), application_name=app)
    if leak_session:
        session = create_session_factory(engine)()  # never closed either
        pid = await session.scalar(text("SELECT pg_backend_pid()"))
    else:
        async with engine.connect() as conn:  # the connection goes back to the pool
            pid = await conn.scalar(text("SELECT pg_backend_pid()"))
    return int(pid or 0)  # and no `await engine.dispose()`: that is the point


RESOURCE_WARNINGS = on(
    asyncpg=each(prefix("ResourceWarning: unclosed")),
    psycopg=each(prefix("ResourceWarning: <psycopg.AsyncConnection> was deleted while still open")),
)
"""What a never-disposed engine's child says in ResourceWarnings, by driver."""


def complaints(stderr: str) -> list[str]:
    """The distinct warnings/errors on stderr, object addresses and fds masked."""
    found: list[str] = []
    for category, message in re.findall(r"(\w+(?:Warning|Error)): ([^\n]*)", stderr):
        if message.startswith("Enable tracemalloc"):
            continue
        message = re.sub(r"<([\w.]+)[^<>]*(?:<[^<>]*>)?[^<>]*>", r"<\1>", message)
        item = f"{category}: {message.split(';')[0].strip()}"
        if item not in found:
            found.append(item)
    return found


def resource_warnings(stderr: str) -> list[str]:
    """The distinct ResourceWarnings on stderr (addresses masked)."""
    return [c for c in complaints(stderr) if c.startswith("ResourceWarning: ")]


def trouble(stderr: str) -> list[str]:
    """What on stderr is not a ResourceWarning (which Python's default filters hide)."""
    found = [c for c in complaints(stderr) if not c.startswith("ResourceWarning: ")]
    for marker in ("Traceback", "Event loop is closed"):
        if marker in stderr and not any(marker in item for item in found):
            found.append(marker)
    return found


@dataclass
class Ended:
    """What one never-disposing child did, and the server after it exited."""

    run: child.ChildRun
    pid: int | None
    """The backend pid the child returned."""
    server_after: int
    """The server's connections of the child's application_name after it exited."""
    alive_after: list[int]
    """Which of the child's backends still exist after it exited."""


async def never_dispose(lab: Lab[Sizes], app: str, *, leak_session: bool) -> Ended:
    # -W default::ResourceWarning shows what Python's default filters would hide
    done = await child.call(
        lab,
        leave_the_engine,
        app,
        leak_session,
        within=60,
        options=("-W", "default::ResourceWarning"),
        env=CHILD_ENV,
    )
    server_after = await probes.settle(lab.engine, app, 0, within=SETTLE)
    pid = int(done.items[0]) if done.finished and done.items else None
    alive = await probes.live_pids(lab.engine, [pid]) if pid else []
    return Ended(done, pid, server_after, alive)


@run.scenario
async def an_engine_never_disposed(lab: Lab[Sizes]) -> None:
    """Two child processes (started together) each build an engine, run one query and end
    asyncio.run() without dispose(): one with its connection back in the pool, one with it
    still held by a session never closed; their exit, their stderr (ResourceWarnings
    shown) and the server after they exit."""
    variants = {
        "engine not disposed": ("child-pool", False),
        "engine not disposed, session not closed": ("child-session", True),
    }
    ended = dict(
        zip(
            variants,
            await asyncio.gather(
                *(
                    never_dispose(lab, lab.name(suffix), leak_session=leak)
                    for suffix, leak in variants.values()
                )
            ),
            strict=True,
        )
    )
    at_shutdown = on(
        # 2.0: interpreter shutdown collects the unclosed session, the fairy's weakref
        # callback runs the GC cleanup there (sys:1); asyncpg's terminate() then calls
        # greenlet.getcurrent(), which fails while greenlet is being finalized
        sa20=on(
            asyncpg=[
                prefix("RuntimeError: greenlet is being finalized"),
                matches(rf"^SAWarning: {GC_WARNING} <AdaptedConnection>, which will be terminated"),
                "Traceback",
            ],
            psycopg=[
                matches(
                    rf"^SAWarning: {GC_WARNING} <AdaptedConnection>, which will be dropped, "
                    "as it cannot be safely terminated"
                )
            ],
        ),
        # 2.1: the fairy's weakref.finalize runs at exit, finds it still referenced: no-op
        sa21=[],
    )
    lab.check(
        "an engine never disposed: the process exits quietly",
        "Not what the asyncio docs' dispose() tip and issue #5990 describe ('RuntimeError: "
        "Event loop is closed' within garbage collection): a child that ends asyncio.run() "
        "without await engine.dispose() exits 0 on every cell. With its connection pooled it "
        "says nothing but ResourceWarnings (hidden by Python's default filters): asyncpg's "
        "'unclosed connection' / 'unclosed transport', psycopg's '<psycopg.AsyncConnection> "
        "was deleted while still open'. With the connection still held by an unclosed "
        "session, SQLAlchemy 2.1 stays as quiet (the checked-out connection's "
        "weakref.finalize runs at exit, finds the session still alive and does nothing), "
        "while 2.0 runs its GC cleanup during interpreter shutdown (a weakref callback): "
        "the SAWarning 'non-checked-in connection' ('will be terminated' on asyncpg, 'will "
        "be dropped, as it cannot be safely terminated' on psycopg) and, on asyncpg, the "
        "logged traceback 'RuntimeError: greenlet is being finalized' of its terminate() "
        "(issue #9234).",
        expected={
            "engine not disposed": {
                "ended": "exit 0",
                "raised": None,
                "stderr besides ResourceWarnings": [],
                "ResourceWarnings": RESOURCE_WARNINGS,
            },
            "engine not disposed, session not closed": {
                "ended": "exit 0",
                "raised": None,
                "stderr besides ResourceWarnings": at_shutdown,
                "ResourceWarnings": RESOURCE_WARNINGS,
            },
        },
        observed={
            variant: {
                "ended": e.run.ended(),
                "raised": e.run.error,
                "stderr besides ResourceWarnings": trouble(e.run.stderr),
                "ResourceWarnings": resource_warnings(e.run.stderr),
            }
            for variant, e in ended.items()
        },
    )
    for variant, e in ended.items():
        lab.note(f"{variant}, stderr: {'; '.join(complaints(e.run.stderr)) or 'empty'}")
    lab.check(
        "the server connection ends with the child process",
        "The server-side connection of a never-disposed engine does not outlive the "
        "process: when it exits the OS closes the socket and the backend goes away.",
        expected={
            variant: {
                "backend pid returned": at_least(1),
                "connections after exit": 0,
                "that backend after exit": [],
            }
            for variant in variants
        },
        observed={
            variant: {
                "backend pid returned": e.pid,
                "connections after exit": e.server_after,
                "that backend after exit": e.alive_after,
            }
            for variant, e in ended.items()
        },
    )
    for variant, e in ended.items():
        lab.figure(f"child process ({variant})", e.run.seconds, "s")
