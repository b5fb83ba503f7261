"""Experiment 9: lost updates, row locks and a SKIP LOCKED queue.

Many tasks, each with its own ``AsyncSession``, increment one counter at the
same time. Under PostgreSQL's default READ COMMITTED, a read-modify-write in
Python (``user.login_count += 1``) loses updates: two transactions read the
same value and the second UPDATE waits for the first, then overwrites it with
its own stale result. Three ways to make it exact are observed:
``select(...).with_for_update()`` (the row lock serialises the tasks), an
atomic ``UPDATE ... SET n = n + 1`` (the server re-reads the committed row),
and a version column (``version_id_col``: the stale UPDATE matches 0 rows,
``StaleDataError``; retried after a random pause, so the losers of one round
do not collide again at once).

A ``FOR UPDATE`` that follows a plain read of the same row in the same session
is observed too: the lock is taken and the current row fetched, but the ORM
keeps the attributes it already loaded, unless ``populate_existing`` is asked
for -- or unless nothing references the first object any more: the identity
map is weak, so the locking SELECT then builds a fresh object. That is why
this bug comes and goes with unrelated code changes.

Then a job queue: worker tasks claim jobs with ``FOR UPDATE SKIP LOCKED``; each
job is processed exactly once and the workers never wait for each other, while
the same loop with a plain ``FOR UPDATE`` has the workers queue on one row lock.

Every connection of this experiment's engine carries ``lock_timeout`` and
``statement_timeout`` as startup settings (a ``SET`` inside the driver's implicit
transaction would last for the first checkout only: the pool's reset ROLLBACK
undoes it; the run re-reads ``lock_timeout`` after a reset and stops if it is not
in effect). No lock wait can hang the run.

Sources:
- SQLAlchemy ORM docs, "Configuring a Version Counter" (``version_id_col``: the
  UPDATE carries ``WHERE version = <loaded>``; a row count other than 1 raises
  ``StaleDataError``; meant to detect two concurrent transactions modifying
  the same row).
- SQLAlchemy Core docs, ``GenerativeSelect.with_for_update`` (``nowait``,
  ``read``, ``of``, ``skip_locked``, ``key_share``).
- SQLAlchemy ORM querying guide, "Populate Existing"; issues
  sqlalchemy/sqlalchemy#4774 ("with_for_update() waits for lock but returns old
  data if object is in identity_map") and #5572 ("document the use of
  populate_existing() with with_for_update()").
- PostgreSQL docs, "Transaction Isolation" / Read Committed (an UPDATE or
  SELECT FOR UPDATE that meets a row updated by a concurrent transaction waits
  for it, then re-evaluates its WHERE clause on the updated version of the row);
  "Explicit Locking" / Row-Level Locks; SELECT, "The Locking Clause" (with
  SKIP LOCKED, rows that cannot be locked immediately are skipped: "can be used
  to avoid lock contention with multiple consumers accessing a queue-like
  table"); runtime config ``lock_timeout``; ``pg_stat_activity``
  (``wait_event_type = 'Lock'``).
- Issue threads: coleifer/huey#817 (with ``FOR UPDATE`` "all but one worker are
  waiting on a row lock so all workers take turns"; SKIP LOCKED lets them run
  concurrently); proteanhq/protean#1087 and #1244 (a version check done in
  Python is a silent lost update under READ COMMITTED; fixed with
  ``version_id_col`` and ``StaleDataError``).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

from sqlalchemy import insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm.exc import StaleDataError

from .db import create_session_factory
from .harness import Lab, describe, experiment, first_line
from .models import Job, JobStatus, User

LOCK_TIMEOUT = "5s"
STATEMENT_TIMEOUT = "30s"
PHASE_TIMEOUT = 90.0  # seconds for one phase (all tasks of one variant), then give up
STALE_MESSAGE = "UPDATE statement on table 'jobs' expected to update 1 row(s); 0 were matched."

_LOCK_WAITERS = text(
    "SELECT wait_event, count(*) FROM pg_stat_activity WHERE datname = current_database() "
    "AND application_name = :app AND wait_event_type = 'Lock' GROUP BY wait_event"
)
# A backend blocked by another transaction's row lock waits on that transaction's id
# ("transactionid") or on the tuple lock ("tuple"). Other heavyweight locks ("extend":
# two backends growing the same table or index file at once) are not row locks.
ROW_LOCK_WAITS = frozenset({"transactionid", "tuple"})


def contention_engine(lab: Lab, size: int) -> AsyncEngine:
    """An engine of ``size`` connections (no overflow) whose lock waits are bounded.

    ``lock_timeout`` / ``statement_timeout`` are startup settings of each connection
    (``server_settings``): a ``SET`` inside the driver's implicit transaction would be
    undone by the pool's reset ROLLBACK. Its connections carry ``application_name =
    lab.tag``.
    """
    return lab.engine_with(
        pool_size=size,
        max_overflow=0,
        pool_timeout=30,
        pool_pre_ping=False,
        server_settings={"lock_timeout": LOCK_TIMEOUT, "statement_timeout": STATEMENT_TIMEOUT},
    )


@dataclass
class LockWaits:
    """What the sampler saw: this run's backends waiting on a row lock, sample by sample."""

    samples: int = 0
    most: int = 0  # most backends seen waiting on a row lock in one sample
    seen: int = 0  # samples with at least one row-lock waiter
    other: Counter[str] = field(default_factory=Counter)  # other lock waits: samples, by kind

    def others(self) -> str:
        """The other lock waits seen, e.g. ``extend in 1 sample``, or ``none``."""
        return ", ".join(f"{kind} in {n} sample(s)" for kind, n in self.other.items()) or "none"


@asynccontextmanager
async def watching_lock_waits(lab: Lab, interval: float = 0.005) -> AsyncIterator[LockWaits]:
    """Sample ``pg_stat_activity`` for this run's backends waiting on a row lock.

    The sampler uses the shared engine (another application_name, so it never
    counts itself) and ends each sample's transaction: pg_stat_activity is a
    snapshot taken once per transaction.
    """
    waits = LockWaits()
    stop = asyncio.Event()

    async def sample() -> None:
        async with lab.engine.connect() as conn:
            while not stop.is_set():
                rows = (await conn.execute(_LOCK_WAITERS, {"app": lab.tag})).all()
                await conn.rollback()
                waiting = sum(n for kind, n in rows if kind in ROW_LOCK_WAITS)
                waits.other.update(str(kind) for kind, _ in rows if kind not in ROW_LOCK_WAITS)
                waits.samples += 1
                waits.most = max(waits.most, waiting)
                waits.seen += waiting > 0
                await asyncio.sleep(interval)

    sampler = asyncio.create_task(sample())
    try:
        yield waits
    finally:
        stop.set()
        async with asyncio.timeout(10):
            await sampler


async def run_concurrently(
    count: int, concurrency: int, one: Callable[[], Awaitable[None]]
) -> list[str]:
    """Run ``one()`` ``count`` times, at most ``concurrency`` at once; the errors, described."""
    gate = asyncio.Semaphore(concurrency)

    async def gated() -> None:
        async with gate:
            await one()

    async with asyncio.timeout(PHASE_TIMEOUT):
        results = await asyncio.gather(*(gated() for _ in range(count)), return_exceptions=True)
    return [describe(r) for r in results if isinstance(r, BaseException)]


# --- the counter, several ways ------------------------------------------------------------

Increment = Callable[[async_sessionmaker[AsyncSession], int, float], Awaitable[None]]


async def naive_increment(
    sessions: async_sessionmaker[AsyncSession], uid: int, pause: float
) -> None:
    """Read the row, think, write back the value computed in Python."""
    async with sessions() as session:
        user = await session.get_one(User, uid)
        await asyncio.sleep(pause)
        user.login_count += 1
        await session.commit()


async def locked_increment(
    sessions: async_sessionmaker[AsyncSession], uid: int, pause: float
) -> None:
    """The same, but the read is SELECT ... FOR UPDATE: the row stays locked until COMMIT."""
    async with sessions() as session:
        stmt = select(User).where(User.id == uid).with_for_update()
        user = (await session.execute(stmt)).scalar_one()
        await asyncio.sleep(pause)
        user.login_count += 1
        await session.commit()


async def read_then_lock(
    sessions: async_sessionmaker[AsyncSession],
    uid: int,
    pause: float,
    *,
    keep: bool,
    populate: bool,
) -> None:
    """A plain read first (say, a permission check), then SELECT ... FOR UPDATE of the same row.

    ``keep``: the first object is still referenced when the locking SELECT runs. The
    session's identity map holds objects weakly, so without a reference it is gone by then.
    """
    async with sessions() as session:
        held = [await session.get_one(User, uid)]
        if not keep:
            held.clear()
        await asyncio.sleep(pause)
        stmt = select(User).where(User.id == uid).with_for_update()
        if populate:
            stmt = stmt.execution_options(populate_existing=True)
        user = (await session.execute(stmt)).scalar_one()
        user.login_count += 1
        await session.commit()


async def atomic_increment(
    sessions: async_sessionmaker[AsyncSession], uid: int, pause: float
) -> None:
    """No read at all: the server computes login_count + 1 on the row it updates.

    (``pause`` is unused: there is no read to think about.)
    """
    async with sessions.begin() as session:
        await session.execute(
            update(User).where(User.id == uid).values(login_count=User.login_count + 1)
        )


@dataclass
class Versioned:
    stale: list[str] = field(default_factory=list)
    tries: int = 0


async def versioned_increment(
    sessions: async_sessionmaker[AsyncSession],
    job_id: int,
    pause: float,
    record: Versioned,
    *,
    backoff: float,
    max_tries: int,
) -> None:
    """Read-modify-write on a versioned row; on StaleDataError wait a random moment (up to
    ``backoff`` s) and start over in a new session."""
    for _ in range(max_tries):
        record.tries += 1
        async with sessions() as session:
            job = await session.get_one(Job, job_id)
            await asyncio.sleep(pause)
            job.attempts += 1
            try:
                await session.commit()
            except StaleDataError as exc:
                record.stale.append(first_line(exc))
            else:
                return
        await asyncio.sleep(random.uniform(0, backoff))  # jitter: the losers do not collide again
    raise RuntimeError(f"no successful increment in {max_tries} tries")


async def counter_value(lab: Lab, uid: int) -> int:
    async with lab.sessions() as session:
        return int(await session.scalar(select(User.login_count).where(User.id == uid)) or 0)


# --- the queue ----------------------------------------------------------------------------


@dataclass
class QueueRun:
    claims: list[tuple[int, str]] = field(default_factory=list)  # (job id, worker), committed
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    sent: list[str] = field(default_factory=list)
    waits: LockWaits = field(default_factory=LockWaits)


async def work_queue(
    sessions: async_sessionmaker[AsyncSession],
    queue: str,
    name: str,
    *,
    batch: int,
    work: float,
    skip_locked: bool,
    claims: list[tuple[int, str]],
    max_rounds: int,
) -> None:
    """Claim up to ``batch`` queued jobs, do the work holding their locks, mark them done."""
    for _ in range(max_rounds):
        async with sessions.begin() as session:
            stmt = (
                select(Job)
                .where(Job.queue == queue, Job.status == JobStatus.queued)
                .order_by(Job.id)
                .with_for_update(skip_locked=skip_locked)
                .limit(batch)
            )
            jobs = list((await session.scalars(stmt)).all())
            if not jobs:
                return
            for job in jobs:
                job.status = JobStatus.done
                job.locked_by = name
                job.attempts += 1
            await asyncio.sleep(work)  # the work itself, done while the rows stay locked
        claims.extend((job.id, name) for job in jobs)  # recorded once the COMMIT succeeded
    raise RuntimeError(f"{name} still finds jobs after {max_rounds} rounds")


async def run_queue(
    lab: Lab,
    engine: AsyncEngine,
    sessions: async_sessionmaker[AsyncSession],
    queue: str,
    *,
    jobs: int,
    workers: int,
    batch: int,
    work: float,
    skip_locked: bool,
) -> QueueRun:
    async with sessions.begin() as session:
        await session.execute(
            insert(Job), [{"queue": queue, "payload": {"n": i}} for i in range(jobs)]
        )
    found = QueueRun()
    with lab.statements(engine) as sent:
        async with watching_lock_waits(lab) as waits, asyncio.timeout(PHASE_TIMEOUT):
            started = time.perf_counter()
            results = await asyncio.gather(
                *(
                    work_queue(
                        sessions,
                        queue,
                        f"worker-{w}",
                        batch=batch,
                        work=work,
                        skip_locked=skip_locked,
                        claims=found.claims,
                        max_rounds=jobs + 1,
                    )
                    for w in range(workers)
                ),
                return_exceptions=True,
            )
            found.seconds = time.perf_counter() - started
    found.waits = waits
    found.sent = [s for s in sent if "FOR UPDATE" in s]
    found.errors = [describe(r) for r in results if isinstance(r, BaseException)]
    return found


async def audit_queue(lab: Lab, queue: str, run: QueueRun, jobs: int) -> tuple[bool, str]:
    """Compare the claims recorded in memory with the table."""
    async with lab.sessions() as session:
        rows = (
            await session.execute(
                select(Job.id, Job.status, Job.attempts, Job.locked_by).where(Job.queue == queue)
            )
        ).all()
    claimed = dict(run.claims)
    twice = len(run.claims) - len(claimed)
    done = sum(r.status is JobStatus.done for r in rows)
    attempts = Counter(r.attempts for r in rows)
    agree = sum(claimed.get(r.id) == r.locked_by for r in rows)
    ok = (
        len(rows) == jobs
        and len(run.claims) == jobs
        and twice == 0
        and set(claimed) == {r.id for r in rows}
        and done == jobs
        and attempts == Counter({1: jobs})
        and agree == jobs
        and not run.errors
    )
    observed = (
        f"{len(run.claims)} claims, {twice} jobs claimed twice; table: {done}/{len(rows)} done, "
        f"attempts {dict(sorted(attempts.items()))}, locked_by = claimer for {agree}; "
        f"errors: {'; '.join(run.errors) or 'none'}"
    )
    return ok, observed


def distribution(run: QueueRun, workers: int) -> list[int]:
    per = Counter(name for _, name in run.claims)
    return [per.get(f"worker-{w}", 0) for w in range(workers)]


@experiment(9, "Lost updates, row locks and a SKIP LOCKED queue")
async def run(
    lab: Lab,
    *,
    increments: int = 100,
    concurrency: int = 10,
    pause: float = 0.002,
    jobs: int = 200,
    contrast_jobs: int = 50,
    workers: int = 5,
    batch: int = 1,
    work: float = 0.002,
) -> None:
    """When many tasks, each with its own AsyncSession, update the same row at once, which
    patterns lose updates (naive read-modify-write) and which are exact (SELECT ... FOR UPDATE,
    an atomic UPDATE, a version column with retry)? And does a FOR UPDATE SKIP LOCKED job
    queue hand every job to exactly one of several workers, without them waiting on each other?"""
    engine = contention_engine(lab, max(concurrency, workers))
    sessions = create_session_factory(engine)
    for _ in range(2):  # the second checkout comes after the pool's reset (a ROLLBACK)
        async with sessions() as session:
            lock_timeout = await session.scalar(text("SHOW lock_timeout"))
    if lock_timeout != LOCK_TIMEOUT:
        raise RuntimeError(f"lock_timeout is {lock_timeout!r} on the pool's connections")

    variants: dict[str, Increment] = {
        "naive": naive_increment,
        "for update": locked_increment,
        "read (kept), then for update": partial(read_then_lock, keep=True, populate=False),
        "read (dropped), then for update": partial(read_then_lock, keep=False, populate=False),
        "read (kept), then for update + populate_existing": partial(
            read_then_lock, keep=True, populate=True
        ),
        "atomic update": atomic_increment,
    }
    async with lab.sessions.begin() as session:
        ids = {
            name: (
                await session.scalars(
                    insert(User).returning(User.id), [{"username": f"{lab.tag}counter-{i}"}]
                )
            ).one()
            for i, name in enumerate(variants)
        }

    finals: dict[str, int] = {}
    errors: dict[str, list[str]] = {}
    atomic_sql: list[str] = []
    locked = LockWaits()  # the lock waits of the "for update" variant
    for name, increment in variants.items():
        async with AsyncExitStack() as stack:  # statements / lock waits only where checked
            sent = stack.enter_context(lab.statements(engine)) if name == "atomic update" else []
            if name == "for update":
                locked = await stack.enter_async_context(watching_lock_waits(lab))
            started = time.perf_counter()
            one = partial(increment, sessions, ids[name], pause)
            errors[name] = await run_concurrently(increments, concurrency, one)
            lab.figure(f"{name}: {increments} increments", time.perf_counter() - started, "s")
        atomic_sql += [s for s in sent if s.startswith("UPDATE users")]
        finals[name] = await counter_value(lab, ids[name])

    lost = increments - finals["naive"]
    lab.figure("naive: lost updates", lost, f"of {increments}")
    lab.check(
        "naive read-modify-write loses updates",
        "session.get(), login_count += 1, commit() from concurrent tasks (a short pause between "
        "read and write) ends below the number of increments: under READ COMMITTED the second "
        "UPDATE waits for the first, then overwrites it with a value computed from a stale read.",
        expected=f"< {increments} (some updates lost)",
        observed=f"{finals['naive']} ({lost} lost)",
        passed=finals["naive"] < increments,
    )
    lab.figure("for update: most backends waiting on the row lock", locked.most, "backends")
    lab.check(
        "with_for_update(): exact, tasks queue on the row lock",
        "select(User).with_for_update() locks the row at the read, so the read-modify-write "
        "cycles run one after another: the count is exact, and the other tasks are seen in "
        "pg_stat_activity waiting on the row lock (wait_event_type = 'Lock', wait_event "
        "'transactionid' or 'tuple').",
        expected=f"{increments}; >= 1 backend waiting on the row lock",
        observed=f"{finals['for update']}; at most {locked.most} waiting "
        f"({locked.seen} of {locked.samples} samples with a waiter)",
        passed=finals["for update"] == increments and locked.most >= 1,
    )
    kept = finals["read (kept), then for update"]
    dropped = finals["read (dropped), then for update"]
    populated = finals["read (kept), then for update + populate_existing"]
    lab.figure("read (kept), then for update: lost updates", increments - kept, f"of {increments}")
    lab.check(
        "FOR UPDATE after a plain read keeps the stale attributes",
        "When the session still holds the object from a plain get() made before the locking "
        "SELECT, SELECT ... FOR UPDATE waits for the lock and fetches the current row, but the "
        "ORM does not overwrite attributes it already loaded (sqlalchemy#4774, #5572): updates "
        "are lost in spite of the lock. execution_options(populate_existing=True) makes it "
        "exact; so does dropping the first object (the identity map holds it weakly, the "
        "locking SELECT then loads a new one), which is why the bug comes and goes.",
        expected=f"kept: < {increments}; kept + populate_existing: {increments}; "
        f"dropped: {increments}",
        observed=f"kept: {kept}; kept + populate_existing: {populated}; dropped: {dropped}",
        passed=kept < increments and populated == increments and dropped == increments,
    )
    arithmetic = bool(atomic_sql) and all("login_count +" in s for s in atomic_sql)
    lab.check(
        "atomic UPDATE ... SET n = n + 1: exact",
        "update(User).values(login_count=User.login_count + 1) sends the arithmetic to the "
        "server, which applies it to the latest committed row version: exact, with no read.",
        expected=f"{increments}; one UPDATE ... SET login_count=(users.login_count + ...) each",
        observed=f"{finals['atomic update']}; {len(atomic_sql)} UPDATE statements, server-side "
        f"arithmetic: {arithmetic}",
        passed=finals["atomic update"] == increments
        and len(atomic_sql) == increments
        and arithmetic,
    )

    # --- the version column ---
    async with lab.sessions.begin() as session:
        job_id = (
            await session.scalars(insert(Job).returning(Job.id), [{"queue": f"{lab.tag}counter"}])
        ).one()
    record = Versioned()
    started = time.perf_counter()
    errors["version column"] = await run_concurrently(
        increments,
        concurrency,
        partial(
            versioned_increment,
            sessions,
            job_id,
            pause,
            record,
            backoff=pause * concurrency,
            max_tries=increments * 10,
        ),
    )
    lab.figure(f"version column: {increments} increments", time.perf_counter() - started, "s")
    async with lab.sessions() as session:
        row = (
            await session.execute(select(Job.attempts, Job.version).where(Job.id == job_id))
        ).one()
    messages = sorted(set(record.stale))
    lab.figure("version column: StaleDataErrors", len(record.stale), "errors")
    lab.figure("version column: tries per increment", record.tries / increments, "x")
    lab.check(
        "version column: a concurrent update raises StaleDataError",
        "With version_id_col the ORM's UPDATE carries WHERE version = <loaded>; when another "
        "transaction committed first, that UPDATE matches 0 rows and commit() raises "
        "sqlalchemy.orm.exc.StaleDataError instead of overwriting.",
        expected=f"> 0 StaleDataError, message: {STALE_MESSAGE}",
        observed=f"{len(record.stale)} StaleDataError, message(s): {' | '.join(messages) or '-'}",
        passed=len(record.stale) > 0 and messages == [STALE_MESSAGE],
    )
    lab.check(
        "version column + retry: exact",
        "Retrying each StaleDataError in a new session until the UPDATE matches gives the exact "
        "count; the version moved once per successful UPDATE.",
        expected=f"attempts {increments}, version {increments + 1}",
        observed=f"attempts {row.attempts}, version {row.version}",
        passed=row.attempts == increments and row.version == increments + 1,
    )
    unexpected = [f"{name}: {e}" for name, errs in errors.items() for e in errs]
    lab.check(
        "no lock timeout or other error",
        f"No task hit lock_timeout ({LOCK_TIMEOUT}) or any error other than the StaleDataErrors "
        "caught for the retry.",
        expected="no error",
        observed="; ".join(sorted(set(unexpected))[:3]) or "no error",
        passed=not unexpected,
    )

    # --- the queue ---
    skip = await run_queue(
        lab,
        engine,
        sessions,
        lab.tag,
        jobs=jobs,
        workers=workers,
        batch=batch,
        work=work,
        skip_locked=True,
    )
    ok, observed = await audit_queue(lab, lab.tag, skip, jobs)
    lab.check(
        "SKIP LOCKED queue: every job done exactly once",
        f"{workers} workers claiming with with_for_update(skip_locked=True): every job is claimed "
        "by exactly one worker (claims recorded in memory agree with status, attempts and "
        "locked_by in the table).",
        expected=f"{jobs} claims, 0 twice; {jobs}/{jobs} done, attempts {{1: {jobs}}}, "
        f"locked_by = claimer for {jobs}; errors: none",
        observed=observed,
        passed=ok,
    )
    spread = distribution(skip, workers)
    lab.figure("SKIP LOCKED: fewest jobs for one worker", min(spread), "jobs")
    lab.figure("SKIP LOCKED: most jobs for one worker", max(spread), "jobs")
    rendered = bool(skip.sent) and all(s.endswith("FOR UPDATE SKIP LOCKED") for s in skip.sent)
    lab.check(
        "SKIP LOCKED queue: every worker gets work",
        "The claim renders as ... FOR UPDATE SKIP LOCKED, and each worker skips the rows the "
        "others hold locked instead of waiting: all workers process jobs.",
        expected=f"FOR UPDATE SKIP LOCKED; {workers} workers with > 0 jobs each",
        observed=f"{'FOR UPDATE SKIP LOCKED' if rendered else skip.sent[:1]}; jobs per worker "
        f"{spread}",
        passed=rendered and all(n > 0 for n in spread),
    )

    plain = await run_queue(
        lab,
        engine,
        sessions,
        f"{lab.tag}for-update",
        jobs=contrast_jobs,
        workers=workers,
        batch=batch,
        work=work,
        skip_locked=False,
    )
    plain_ok, plain_observed = await audit_queue(lab, f"{lab.tag}for-update", plain, contrast_jobs)
    lab.check(
        "SKIP LOCKED never waits; plain FOR UPDATE makes workers queue",
        "Sampling pg_stat_activity: with SKIP LOCKED no worker is ever seen waiting on a row "
        "lock (wait_event 'transactionid' or 'tuple'); the same loop with plain FOR UPDATE has "
        "workers waiting on the first queued row (coleifer/huey#817: 'all workers take turns'); "
        "it still processes every job once. Other lock waits are reported, not counted "
        "(e.g. 'extend': two backends growing the same table or index file at once).",
        expected="SKIP LOCKED: 0 waiting on a row lock; FOR UPDATE: >= 1 waiting, every job once",
        observed=f"SKIP LOCKED: at most {skip.waits.most} waiting on a row lock "
        f"({skip.waits.samples} samples; other lock waits: {skip.waits.others()}); "
        f"FOR UPDATE: at most {plain.waits.most} waiting ({plain.waits.seen} of "
        f"{plain.waits.samples} samples), every job once: {plain_ok}"
        + ("" if plain_ok else f" ({plain_observed})"),
        passed=skip.waits.samples > 0
        and skip.waits.most == 0
        and plain.waits.most >= 1
        and plain_ok,
    )
    lab.figure(f"SKIP LOCKED: {jobs} jobs drained", skip.seconds, "s")
    lab.figure(f"plain FOR UPDATE: {contrast_jobs} jobs drained", plain.seconds, "s")
    skip_rate, plain_rate = jobs / skip.seconds, contrast_jobs / plain.seconds
    lab.figure("SKIP LOCKED throughput", skip_rate, "jobs/s")
    lab.figure("plain FOR UPDATE throughput", plain_rate, "jobs/s")
    lab.figure("SKIP LOCKED throughput / plain FOR UPDATE throughput", skip_rate / plain_rate, "x")
    lab.figure("plain FOR UPDATE: most workers waiting on a lock", plain.waits.most, "backends")
    lab.note(
        f"Lock waits are bounded on every connection of this experiment's engine: "
        f"lock_timeout = {LOCK_TIMEOUT}, statement_timeout = {STATEMENT_TIMEOUT}."
    )
