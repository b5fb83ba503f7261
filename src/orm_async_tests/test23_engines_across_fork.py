"""What happens to an async engine whose pool already holds connections when the process forks
(a gunicorn master that runs ``asyncio.run(warm_up())`` before forking its uvicorn workers,
``multiprocessing`` with the fork start method): do the workers share the master's
backends, get each other's answers, break the master's connections, and which of
SQLAlchemy's recipes (``dispose(close=False)``, ``dispose()``, a new engine) is safe?

The experiment's own process never forks: a child process (started with ``lab.child``)
plays the master. For each mode it builds an engine (``pool_size=2``, no overflow, the
project's ``pool_pre_ping=True`` unless the mode says otherwise, an ``application_name`` of
the run), checks two connections out at once inside ``asyncio.run`` so that the pool keeps
two, and records their backend pids. Then, with no event loop running, it forks two workers
that start together (both wait on a pipe the master closes) and each, in an event loop of
its own, does what the mode says with the engine it inherited and runs ``SELECT
pg_backend_pid(), CAST(:v AS int)`` (``queries`` times, 40 by default) from two concurrent
tasks (one checkout per query, each value sent once, a worker's values apart from the
other's). A worker reports every result on a pipe as it gets it (so a worker killed later
has said what it saw) and leaves with ``os._exit``. The master waits for both (one still
running after ``worker_timeout`` seconds is killed and counted as hung), reaps them, asks
the server (on a connection of its own) which of its two backends still exist, then uses
its engine again and disposes it. A wrong answer is a value returned that is not the value
sent. Last, the experiment checks that no worker process and no backend of the run is left.

Observed: what decides everything is that asyncpg's connections belong to the event loop
that opened them, which ``asyncio.run`` closed before the fork (experiment 12), while
psycopg's work from any loop. Used as is in the workers, asyncpg's inherited connections
cannot be used at all: each worker's first checkout of each of them fails (pre-ping:
``RuntimeError``, a Future attached to a different loop), the pool replaces them with
connections of the worker's own, and no worker query ever reaches a backend of the master:
4 errors, never a wrong answer, the master's backends untouched. psycopg's can be used, so
the workers really share the master's sockets, and some worker soon reads a reply meant for
another process (``can't change 'autocommit' now: connection in transaction status
INTRANS``, ``unexpected result EMPTY_QUERY``) or waits for one the other worker read (and
is killed by the master); on most runs SQLAlchemy then closes the connection in the worker,
the close reaches the server through the shared socket and ends the master's backend, and
the other process sees ``server closed the connection unexpectedly``. The master's own
pre-ping replaces its dead connections without an error, so it never learns. Without
pre-ping (SQLAlchemy's default) nothing tests or closes them: the workers are answered by
the master's backends and the replies cross (while writing this: a wrong answer, the other
worker's value, in 18 of 20 runs on SQLAlchemy 2.0 and 2.1, up to 15 in a run; results
"that do not return rows"; in every run a worker waiting for an answer the other one read),
and afterwards the master's connections still answer it correctly, no trace left. asyncpg
without pre-ping breaks for good instead: the failed first query leaves each connection
"another operation is in progress" for every later checkout, in the workers and in the
master. ``dispose(close=False)`` in the worker (SQLAlchemy's recommended recipe) and a new
engine in the worker are clean on both drivers: the workers open their own connections and
the master's backends are left as they were. ``dispose()`` (close=True) in a worker closes
the connections it inherited, which are the master's: the server ends both of the master's
backends, on both drivers (psycopg's master reconnects without an error). asyncpg's master
fails twice after the fork in every mode for the loop reason alone, so only the psycopg
master shows what the workers did to it. The same on SQLAlchemy 2.0 and 2.1, on PostgreSQL
15 (TCP) and 18 (Unix socket).

Sources: SQLAlchemy docs, "Connection Pooling" - "Using Connection Pools with
Multiprocessing or os.fork()" (pooled connections must not be shared with a forked process:
"non-working connections" or "socket connections that are used by multiple processes
concurrently, leading to broken messaging"; the recommended approach is
``Engine.dispose(close=False)`` in the child's initializer, "so that the new process will
not touch any of the parent process' connections"): confirmed, the first on asyncpg, the
second on psycopg, and the recipe clean on both. ``AsyncEngine.dispose`` docstring
(``close=False``: the old pool "is de-referenced, and otherwise not touched in any way";
the default closes every checked-in connection): confirmed, and in a forked worker the
connections it closes are the master's. SQLAlchemy asyncio docs, "Using multiple asyncio
event loops" (the loop binding behind the asyncpg results; experiment 12). libpq docs,
"Database Connection Control Functions" (forking with open connections "can lead to
unpredictable results because the parent and child processes share the same sockets"):
confirmed with psycopg. psycopg/psycopg#651 (a pool cannot be created before forking and
shared: create it after the fork): confirmed for SQLAlchemy's pool over psycopg.
MagicStack/asyncpg#1037 (connections opened before ``os.fork()`` give "all kinds of errors"
when two workers use the same one): with an ``asyncio.run`` warm-up the workers cannot use
them at all, so the errors observed here are the closed loop's, not a shared socket's.
psycopg source, ``pq_ctypes.PGconn.__del__`` (on garbage collection a connection is closed
only in the process that created it): consistent with the pool ``dispose(close=False)``
drops in a worker leaving the master's backends alone. psycopg/psycopg#1371 (after a
cancelled query psycopg waits at most 5 s for the server, then closes the connection): the
worker whose answer the other one read is still waiting when the master kills it
(``worker_timeout`` 3 s); while writing this, with a longer ``worker_timeout`` that worker
gave up after about 5 s, logged "query not terminated after cancellation: closing
connection", and that close ended the master's backend too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import select
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import NullPool

from .db import Database, open_database
from .lab import (
    BadSizes,
    Lab,
    at_least,
    child,
    describe,
    each,
    experiment,
    not_here,
    on,
    prefix,
)
from .lab.probes import poll

QUERY = text("SELECT pg_backend_pid(), CAST(:v AS int)")
"""What every query asks: which backend answers, and the value it was sent."""
POOL = 2
"""Connections the engine under test pools (``pool_size``, no overflow): both warmed."""
WORKERS = 2
"""Workers forked per mode."""
TASKS = 2
"""Concurrent tasks per worker: with two, each worker has both pooled connections in use."""
BOUND = 5.0
"""Seconds the experiment's own waits (for the server to drop the run's backends) may take."""


@dataclass(frozen=True)
class Sizes:
    queries: int = 40
    """Queries each forked worker runs (from two concurrent tasks, one checkout each)."""
    master_queries: int = 6
    """Queries the master runs on its engine once the workers are gone (one at a time)."""
    query_timeout: float = 1.0
    """Seconds one query (its checkout included) may take before it counts as an error."""
    worker_timeout: float = 3.0
    """Seconds from the start of the workers until the master kills one still running."""
    child_timeout: float = 60.0
    """Seconds the child process (the master, every mode) may run before it is killed."""

    def __post_init__(self) -> None:
        if self.queries < 10 or self.master_queries < 3:
            raise BadSizes("queries must be ≥ 10 and master_queries ≥ 3: fewer prove nothing")
        if not 0 < self.query_timeout < self.worker_timeout:
            raise BadSizes("need 0 < query_timeout < worker_timeout")
        if self.child_timeout < len(MODES) * (self.worker_timeout + 6 * self.query_timeout):
            raise BadSizes("child_timeout must leave every mode its worker_timeout and more")


run = experiment(23, "Engines across fork", Sizes)


@dataclass(frozen=True)
class Mode:
    """What each forked worker does with the engine it inherited."""

    key: str
    prepare: str
    """``"none"``, ``"dispose(close=False)"``, ``"dispose()"`` or ``"fresh engine"``."""
    pre_ping: bool = True


MODES = (
    Mode("as is", "none"),
    Mode("dispose(close=False)", "dispose(close=False)"),
    Mode("dispose()", "dispose()"),
    Mode("fresh engine", "fresh engine"),
    Mode("as is, no pre-ping", "none", pre_ping=False),  # last: a worker of it may hang
)

DIFFERENT_LOOP = "RuntimeError: Task got Future attached to a different loop"
"""How asyncpg fails on a connection of a closed loop (object reprs left out)."""


# ---------------------------------------------------------------- in a forked worker
def quiet() -> None:
    """SQLAlchemy's pool logs every connection it fails to close with a traceback (on
    stderr, through logging's last resort): here the errors are counted instead."""
    logger = logging.getLogger("sqlalchemy")
    logger.addHandler(logging.NullHandler())
    logger.propagate = False


def short(exc: BaseException) -> str:
    """``describe(exc)`` without object reprs (task and future names differ per run)."""
    found = re.sub(r"Task <.*> got Future <.*> attached", "Task got Future attached", describe(exc))
    return found[:160]


def emit(out: int, item: dict[str, Any]) -> None:
    """One JSON line on the worker's pipe."""
    os.write(out, (json.dumps(item) + "\n").encode())


async def queries(
    engine: AsyncEngine, base: int, count: int, limit: float, out: int | None, *, tasks: int
) -> dict[str, Any]:
    """``count`` queries (``base + k`` sent) from ``tasks`` concurrent tasks, one checkout
    per query, each given ``limit`` seconds: the backend pids, the errors and the wrong
    answers; each result is also written on ``out`` when given."""
    pids: list[int] = []
    errors: Counter[str] = Counter()
    wrong: list[list[int]] = []

    async def one(sent: int) -> None:
        item: dict[str, Any] = {"sent": sent}
        try:
            async with asyncio.timeout(limit):
                async with engine.connect() as conn:
                    row = (await conn.execute(QUERY, {"v": sent})).one()
        except TimeoutError:
            item["error"] = f"no answer within {limit:g} s"
        except Exception as exc:
            item["error"] = short(exc)
        else:
            item.update(pid=int(row[0]), got=int(row[1]))
        if out is not None:
            emit(out, item)
        if "error" in item:
            errors[item["error"]] += 1
        else:
            pids.append(item["pid"])
            if item["got"] != sent:
                wrong.append([sent, item["got"]])

    async def task(first: int) -> None:
        for k in range(first, count, tasks):
            await one(base + k)

    await asyncio.gather(*(task(first) for first in range(tasks)))
    return {
        "pids": sorted(set(pids)),
        "answered": len(pids),
        "errors": dict(errors),
        "wrong": wrong,
    }


async def in_worker(
    db: Database, mode: Mode, index: int, barrier: int, out: int, plan: dict[str, Any]
) -> None:
    """The worker's event loop: what the mode does with the engine, the barrier, the
    queries; then the worker's own connections closed (never the inherited ones)."""
    engine = db.engine
    try:
        async with asyncio.timeout(plan["query_timeout"] * 3):
            if mode.prepare == "dispose(close=False)":
                await engine.dispose(close=False)
            elif mode.prepare == "dispose()":
                await engine.dispose()
            elif mode.prepare == "fresh engine":
                engine = make_engine(plan["tag"], pre_ping=mode.pre_ping, like=db).engine
        emit(out, {"step": "ok"})
    except Exception as exc:
        emit(out, {"step": short(exc)})
    select.select([barrier], [], [], plan["worker_timeout"])  # the master's EOF: go
    found = await queries(
        engine, (index + 1) * 10_000, plan["queries"], plan["query_timeout"], out, tasks=TASKS
    )
    if mode.prepare != "none":  # its pool holds only connections the worker opened
        async with asyncio.timeout(plan["query_timeout"] * 3):
            await engine.dispose()
    emit(out, {"done": True, "answered": found["answered"]})


def worker(
    db: Database, mode: Mode, index: int, barrier: int, out: int, plan: dict[str, Any]
) -> None:
    """A forked worker: its own event loop, a report on ``out``, then ``os._exit``
    (never back into the master's code, no atexit, no garbage collection at exit)."""
    code = 0
    try:
        quiet()
        asyncio.run(in_worker(db, mode, index, barrier, out, plan))
    except BaseException as exc:
        code = 1
        with suppress(BaseException):  # the pipe may be gone: the exit code still says it
            emit(out, {"crashed": short(exc)})
    finally:
        os._exit(code)


# ---------------------------------------------------------------- in the master
def make_engine(tag: str, *, pre_ping: bool, like: Database | None = None) -> Database:
    """The engine under test: two pooled connections, no overflow, named ``tag``; on the
    server of ``like`` (else the environment's)."""
    return open_database(
        like.settings if like is not None else None,
        target=like.target if like is not None else None,
        pool_size=POOL,
        max_overflow=0,
        pool_timeout=1.0,
        pool_pre_ping=pre_ping,
        application_name=tag,
    )


def reap(children: dict[int, int], bound: float) -> list[dict[str, Any]]:
    """Read each worker's pipe until it exits; SIGKILL one still running ``bound``
    seconds from now; every worker reaped. Per worker: its pid, how it ended, what it
    reported."""
    deadline = time.monotonic() + bound
    lines: dict[int, bytes] = dict.fromkeys(children, b"")
    status: dict[int, str] = {}
    reading = {fd: pid for pid, fd in children.items()}
    while len(status) < len(children) or reading:
        if reading:
            left = max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select(list(reading), [], [], min(0.02, left))
            for fd in ready:
                chunk = os.read(fd, 65536)
                if chunk:
                    lines[reading[fd]] += chunk
                else:
                    os.close(fd)
                    del reading[fd]
        else:
            time.sleep(0.005)
        for pid in children:
            if pid not in status:
                done, code = os.waitpid(pid, os.WNOHANG)
                if done:
                    status[pid] = ended(code)
        if time.monotonic() > deadline:
            for pid in children:
                if pid not in status:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    status[pid] = "hung: killed by the master"
            for fd in reading:
                os.close(fd)
            reading.clear()
    return [{"pid": pid, **collect(lines[pid], status[pid])} for pid in children]


def collect(raw: bytes, status: str) -> dict[str, Any]:
    """A worker's lines as one report."""
    pids: set[int] = set()
    errors: Counter[str] = Counter()
    wrong: list[list[int]] = []
    found: dict[str, Any] = {"ended": status, "step": None, "finished": False, "crashed": None}
    answered = 0
    for line in raw.decode(errors="replace").splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if "step" in item:
            found["step"] = item["step"]
        elif "done" in item:
            found["finished"] = True
        elif "crashed" in item:
            found["crashed"] = item["crashed"]
        elif "error" in item:
            errors[item["error"]] += 1
        elif "pid" in item:
            answered += 1
            pids.add(item["pid"])
            if item["got"] != item["sent"]:
                wrong.append([item["sent"], item["got"]])
    return {
        **found,
        "answered": answered,
        "pids": sorted(pids),
        "errors": dict(errors),
        "wrong": wrong,
    }


def ended(code: int) -> str:
    if os.WIFSIGNALED(code):
        return f"killed by {signal.Signals(os.WTERMSIG(code)).name}"
    return f"exit {os.WEXITSTATUS(code)}"


async def warm(db: Database) -> list[int]:
    """Two connections checked out at once, so that the pool keeps two: their backends."""
    async with db.engine.connect() as a, db.engine.connect() as b:
        return [
            int(await a.scalar(text("SELECT pg_backend_pid()")) or 0),
            int(await b.scalar(text("SELECT pg_backend_pid()")) or 0),
        ]


async def afterwards(db: Database, warm_pids: list[int], plan: dict[str, Any]) -> dict[str, Any]:
    """The master once the workers are gone: which of its backends the server still has
    (asked on a connection of its own), then its engine used again, then disposed."""
    probe = open_database(
        db.settings, target=db.target, poolclass=NullPool, application_name=plan["tag"] + "probe"
    )
    try:
        async with probe.engine.connect() as conn:
            alive = list(
                await conn.scalars(
                    text("SELECT pid FROM pg_stat_activity WHERE pid = ANY(:p) ORDER BY pid"),
                    {"p": warm_pids},
                )
            )
    finally:
        await probe.dispose()
    found = await queries(
        db.engine, 0, plan["master_queries"], plan["query_timeout"], None, tasks=1
    )
    try:
        async with asyncio.timeout(plan["query_timeout"] * 3):
            await db.dispose()
    except Exception as exc:
        found["dispose"] = short(exc)
    return {"warm alive": [int(p) for p in alive], **found}


def one_mode(mode: Mode, plan: dict[str, Any]) -> dict[str, Any]:
    """The master for one mode: the engine, the warm-up in ``asyncio.run``, two forked
    workers started together and reaped, then the master's engine again."""
    started = time.perf_counter()
    db = make_engine(plan["tag"], pre_ping=mode.pre_ping)
    warm_pids = asyncio.run(warm(db))
    barrier_r, barrier_w = os.pipe()
    children: dict[int, int] = {}
    for index in range(WORKERS):
        out_r, out_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker keeps the barrier's read end and its own pipe's write end
            os.close(barrier_w)
            os.close(out_r)
            for fd in children.values():
                os.close(fd)
            worker(db, mode, index, barrier_r, out_w, plan)
        os.close(out_w)
        children[pid] = out_r
    os.close(barrier_r)
    os.close(barrier_w)  # EOF at the barrier: both workers start their queries now
    workers = reap(children, plan["worker_timeout"])
    master = asyncio.run(afterwards(db, warm_pids, plan))
    return {
        "mode": mode.key,
        "warm": warm_pids,
        "workers": workers,
        "master": master,
        "seconds": time.perf_counter() - started,
    }


def fork_modes(tag: str, sizes: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """In the child process (the master; no event loop runs while it forks): every mode
    in turn, each with its own engine and ``application_name``."""
    quiet()
    for mode in MODES:
        yield one_mode(mode, {**sizes, "tag": f"{tag}{slug(mode.key)}"})


def slug(key: str) -> str:
    return re.sub(r"[^a-z]+", "-", key).strip("-") + "-"


# ---------------------------------------------------------------- the experiment's side
@dataclass(frozen=True)
class Forked:
    """What the child reported, per mode, and how it ended."""

    reports: dict[str, dict[str, Any]]
    ended: str
    stderr: list[str]
    seconds: float

    def of(self, key: str) -> dict[str, Any]:
        if key not in self.reports:
            raise RuntimeError(f"the master did not report mode {key!r} (child: {self.ended})")
        return self.reports[key]


@asynccontextmanager
async def forked(lab: Lab[Sizes]) -> AsyncIterator[Forked]:
    """One child process plays the master for every mode, one after another."""
    sizes = {
        "queries": lab.sizes.queries,
        "master_queries": lab.sizes.master_queries,
        "query_timeout": lab.sizes.query_timeout,
        "worker_timeout": lab.sizes.worker_timeout,
    }
    done = await child.call(lab, fork_modes, lab.tag, sizes, within=lab.sizes.child_timeout)
    ended = done.ended() if done.error is None else f"{done.ended()}, raised {done.error}"
    yield Forked(
        {str(item["mode"]): item for item in done.items},
        ended,
        done.stderr.strip().splitlines(),
        done.seconds,
    )


def workers_saw(report: dict[str, Any]) -> dict[str, Any]:
    """The workers' side of one mode, summed over both workers."""
    warm = set(report["warm"])
    workers = report["workers"]
    errors = sum(sum(w["errors"].values()) for w in workers)
    wrong = sum(len(w["wrong"]) for w in workers)
    hung = sum(1 for w in workers if w["ended"].startswith("hung"))
    return {
        "queries answered": sum(w["answered"] for w in workers),
        "errors": errors,
        "wrong answers": wrong,
        "hung workers": hung,
        "errors + wrong answers + hung workers": errors + wrong + hung,
        "workers answered by a backend of the master": sum(
            1 for w in workers if warm & set(w["pids"])
        ),
        "error kinds": sorted({e for w in workers for e in w["errors"]}),
    }


def master_saw(report: dict[str, Any]) -> dict[str, Any]:
    """The master's side of one mode, once its workers are gone."""
    master = report["master"]
    return {
        "its backends the server still has": len(master["warm alive"]),
        "errors": sum(master["errors"].values()),
        "wrong answers": len(master["wrong"]),
        "its warm backends that answered": len(set(report["warm"]) & set(master["pids"])),
        "error kinds": sorted(master["errors"]),
    }


def record(lab: Lab[Sizes], report: dict[str, Any]) -> None:
    """The mode's figures, and a note for a worker that crashed or failed its first step."""
    seen = workers_saw(report)
    lab.figure("this mode: warm-up, workers, master", report["seconds"], "s")
    for key in ("errors", "wrong answers", "hung workers"):
        lab.figure(f"workers: {key}", seen[key])
    lab.figure(
        "workers answered by a backend of the master",
        seen["workers answered by a backend of the master"],
    )
    lab.figure("master's backends the workers ended", POOL - len(report["master"]["warm alive"]))
    for w in report["workers"]:
        if w["crashed"] is not None or w["step"] != "ok" or not w["finished"]:
            lab.note(
                f"Worker {w['pid']} did not finish ({w['ended']}) after {w['answered']} "
                f"answers; its first step: {w['step']}; crashed: {w['crashed']}."
            )
    wrong = [pair for w in report["workers"] for pair in w["wrong"]]
    if wrong:
        lab.note(
            "Wrong answers (sent → returned), first ones: "
            + ", ".join(f"{sent} → {got}" for sent, got in wrong[:4])
            + " (worker 1 sends 10000 + k, worker 2 sends 20000 + k)."
        )


def clean(lab: Lab[Sizes]) -> dict[str, Any]:
    """What two workers that never touch the master's connections see."""
    return {
        "queries answered": WORKERS * lab.sizes.queries,
        "errors": 0,
        "wrong answers": 0,
        "hung workers": 0,
        "errors + wrong answers + hung workers": 0,
        "workers answered by a backend of the master": 0,
        "error kinds": [],
    }


ANOTHER_OPERATION = "InterfaceError: cannot perform operation: another operation is in progress"
LOOP_ONLY = (
    "asyncpg: the master's engine fails twice whatever the workers did (its connections "
    "belong to the closed warm-up loop), then reconnects."
)


def untouched_master(lab: Lab[Sizes]) -> dict[str, Any]:
    """The master after workers that left its connections alone."""
    return {
        "its backends the server still has": POOL,
        "errors": on(asyncpg=2, psycopg=0),
        "wrong answers": 0,
        "its warm backends that answered": on(asyncpg=0, psycopg=POOL),
        "error kinds": on(asyncpg=[DIFFERENT_LOOP], psycopg=[]),
    }


# ---------------------------------------------------------------- the scenarios
@run.scenario
async def the_engine_as_is(lab: Lab[Sizes]) -> None:
    """The workers use the inherited engine as it is (pool_pre_ping on, as the project
    configures it)."""
    found = (await lab.use(forked)).of("as is")
    record(lab, found)
    seen, master = workers_saw(found), master_saw(found)
    lab.check(
        "as is: the workers fail",
        "Used as is, the inherited engine fails in the workers on both drivers. asyncpg: "
        "each worker's first checkout of each of the two inherited connections fails (the "
        "pre-ping awaits a Future of the closed warm-up loop) and the pool replaces them: "
        "4 errors. psycopg: the workers share the master's sockets and some worker soon "
        "reads a reply meant for another process; how many errors, and whether a worker "
        "is answered by a backend of the master before that, depends on timing (figures).",
        expected={
            "errors + wrong answers + hung workers": on(asyncpg=2 * WORKERS, psycopg=at_least(1))
        },
        observed={k: seen[k] for k in ("errors + wrong answers + hung workers",)},
    )
    lab.check(
        "as is, asyncpg: the inherited connections cannot be used, so never shared",
        "With asyncpg no worker query ever reaches a backend of the master: the only "
        "errors are the closed loop's, every other query is answered right on a "
        "connection the worker opened itself, and the workers' failed pre-pings closed "
        "nothing on the server: both of the master's backends are still there.",
        expected=on(
            asyncpg={
                "queries answered": WORKERS * (lab.sizes.queries - 2),
                "wrong answers": 0,
                "workers answered by a backend of the master": 0,
                "error kinds": [DIFFERENT_LOOP],
                "master's backends the server still has": POOL,
            },
            psycopg=not_here(
                "psycopg's inherited connections are usable: which queries reach the "
                "master's backends, how they fail and whether a failure ends one of the "
                "master's backends is a matter of timing here (figures)"
            ),
        ),
        observed={
            **{
                k: seen[k]
                for k in (
                    "queries answered",
                    "wrong answers",
                    "workers answered by a backend of the master",
                    "error kinds",
                )
            },
            "master's backends the server still has": master["its backends the server still has"],
        },
    )
    lab.check(
        "as is: the master afterwards",
        "asyncpg: the master's engine fails twice: its connections belong to the closed "
        "warm-up loop (as in every mode below), then it reconnects. psycopg: where a "
        "worker's failure made SQLAlchemy close a shared connection, the close reached "
        "the server and ended that backend of the master too (figure); the master's own "
        "pre-ping replaces what is gone without an error, and every query of the master is "
        "answered right: it never learns what happened.",
        expected={
            "errors": on(asyncpg=2, psycopg=0),
            "wrong answers": 0,
            "error kinds": on(asyncpg=[DIFFERENT_LOOP], psycopg=[]),
        },
        observed={k: master[k] for k in ("errors", "wrong answers", "error kinds")},
    )


@run.scenario
async def dispose_close_false_in_the_workers(lab: Lab[Sizes]) -> None:
    """Each worker calls engine.dispose(close=False) first (SQLAlchemy's recommended
    recipe), then runs its queries."""
    found = (await lab.use(forked)).of("dispose(close=False)")
    record(lab, found)
    lab.check(
        "dispose(close=False): the workers open their own connections",
        "The worker drops the inherited pool without touching its connections and opens "
        "connections of its own: every query answered right, none by a backend of the "
        "master, on both drivers.",
        expected=clean(lab),
        observed=workers_saw(found),
    )
    lab.check(
        "dispose(close=False): the master's connections are left alone",
        "Both of the master's backends are still there after the workers; psycopg's "
        "master goes on using them (no error, both answer). " + LOOP_ONLY,
        expected=untouched_master(lab),
        observed=master_saw(found),
    )


@run.scenario
async def dispose_in_the_workers(lab: Lab[Sizes]) -> None:
    """Each worker calls engine.dispose() (close=True, the default) first, then runs its
    queries."""
    found = (await lab.use(forked)).of("dispose()")
    record(lab, found)
    lab.check(
        "dispose(): the workers themselves are fine",
        "The workers' own queries go well on both drivers: dispose() left them an empty "
        "pool, and they open connections of their own.",
        expected=clean(lab),
        observed=workers_saw(found),
    )
    lab.check(
        "dispose(): the workers close the master's backends",
        "dispose() closes every connection checked in to the pool, and in a forked worker "
        "those are the master's: the close goes through the shared socket and the server "
        "ends both of the master's backends, on both drivers. psycopg's master does not "
        "notice (its pre-ping reconnects, no error); asyncpg's fails twice as in every "
        "mode, here because its sockets are closed (RuntimeError as well).",
        expected={
            "its backends the server still has": 0,
            "errors": on(asyncpg=2, psycopg=0),
            "wrong answers": 0,
            "its warm backends that answered": 0,
            "error kinds": on(asyncpg=each(prefix("RuntimeError")), psycopg=[]),
        },
        observed=master_saw(found),
    )


@run.scenario
async def a_fresh_engine_in_the_workers(lab: Lab[Sizes]) -> None:
    """Each worker builds an engine of its own and never uses the inherited one."""
    found = (await lab.use(forked)).of("fresh engine")
    record(lab, found)
    lab.check(
        "fresh engine: the workers are clean",
        "An engine made in the worker has only the worker's connections: every query "
        "answered right, none by a backend of the master, on both drivers.",
        expected=clean(lab),
        observed=workers_saw(found),
    )
    lab.check(
        "fresh engine: the master's connections are left alone",
        "The inherited engine is never used in the worker and the worker leaves with "
        "os._exit (no garbage collection): the master's two backends are still there and "
        "psycopg's master goes on using them. " + LOOP_ONLY,
        expected=untouched_master(lab),
        observed=master_saw(found),
    )


@run.scenario
async def the_engine_as_is_without_pre_ping(lab: Lab[Sizes]) -> None:
    """As the first scenario, with pool_pre_ping=False (SQLAlchemy's default) on the
    master's engine."""
    found = (await lab.use(forked)).of("as is, no pre-ping")
    record(lab, found)
    seen = workers_saw(found)
    lab.check(
        "no pre-ping: psycopg's workers share the master's backends, asyncpg's always fail",
        "psycopg: with nothing to test a connection at checkout, both workers' queries are "
        "answered by the master's two backends, and the replies cross: a worker gets the "
        "value the other worker sent (a wrong answer, no error), a result without rows, or "
        "waits for an answer the other worker read and is killed by the master (how many "
        "of each depends on timing: figures). asyncpg: every query of both workers fails "
        "(first the closed loop, then 'another operation is in progress' for good: the "
        "failed first query never ended on that connection and nothing replaces it).",
        expected={
            "errors + wrong answers + hung workers": on(
                asyncpg=2 * lab.sizes.queries, psycopg=at_least(1)
            ),
            "workers answered by a backend of the master": on(asyncpg=0, psycopg=at_least(1)),
        },
        observed={
            k: seen[k]
            for k in (
                "errors + wrong answers + hung workers",
                "workers answered by a backend of the master",
            )
        },
    )
    lab.check(
        "no pre-ping: the master afterwards",
        "psycopg: nothing closed the master's connections (no worker closed them, the "
        "hung one was killed first), so both backends are there and the master's queries "
        "on them are answered right: the sharing leaves the master no trace. asyncpg: the "
        "master's engine is broken for good as well, every query fails.",
        expected={
            "its backends the server still has": POOL,
            "errors": on(asyncpg=lab.sizes.master_queries, psycopg=0),
            "wrong answers": 0,
            "its warm backends that answered": on(asyncpg=0, psycopg=POOL),
            "error kinds": on(asyncpg=[ANOTHER_OPERATION, DIFFERENT_LOOP], psycopg=[]),
        },
        observed=master_saw(found),
    )


@run.scenario
async def nothing_left_behind(lab: Lab[Sizes]) -> None:
    """After the child: every worker process gone, the child ended normally, and no
    backend of the run left on the server (polled, bounded)."""
    forked_ = await lab.use(forked)
    lab.figure("child process, every mode", forked_.seconds, "s")
    pids = [w["pid"] for report in forked_.reports.values() for w in report["workers"]]
    running = [pid for pid in pids if alive(pid)]
    left = await poll(lambda: tagged_backends(lab), lambda n: n == 0, within=BOUND, every=0.05)
    lab.note(
        f"The child printed {len(forked_.stderr)} line(s) on stderr (first: "
        f"{(forked_.stderr or ['(none)'])[0]!r})."
    )
    lab.check(
        "nothing left behind",
        "Every mode reported; both workers of each were reaped (a hung one killed) and "
        "none is running; the child exited normally; the server has no backend of this "
        "run left once the processes are gone.",
        expected={
            "modes reported": [m.key for m in MODES],
            "worker processes reaped": WORKERS * len(MODES),
            "worker processes still running": [],
            "the child": "exit 0",
            "backends of the run on the server": 0,
        },
        observed={
            "modes reported": list(forked_.reports),
            "worker processes reaped": len(pids),
            "worker processes still running": running,
            "the child": forked_.ended,
            "backends of the run on the server": left.value,
        },
    )


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def tagged_backends(lab: Lab[Sizes]) -> int:
    """Backends whose application_name starts with the run's tag (every mode's engine
    and probe), the asking connection excluded."""
    async with lab.engine.connect() as conn:
        found = await conn.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
                "AND starts_with(application_name, :tag)"
            ),
            {"tag": lab.tag},
        )
    return int(found or 0)
