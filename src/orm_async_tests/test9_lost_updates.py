"""When many tasks, each with its own AsyncSession, update the same row at once, which
patterns lose updates (naive read-modify-write) and which are exact (SELECT ... FOR UPDATE,
an atomic UPDATE, a version column with retry)? And does a FOR UPDATE SKIP LOCKED job
queue hand every job to exactly one of several workers, without them waiting on each other?

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
A sampler reads ``pg_stat_activity`` in the background and tells row-lock waits
(``wait_event`` ``transactionid`` / ``tuple``) from other heavyweight lock waits
(``extend``...), which are reported by kind, not counted.

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
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

from sqlalchemy import insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm.exc import StaleDataError

from .lab import (
    BadSizes,
    Lab,
    at_least,
    between,
    describe,
    each,
    experiment,
    first_line,
    matches,
    probes,
)
from .models import Job, JobStatus, User


@dataclass(frozen=True)
class Sizes:
    increments: int = 50
    """Concurrent increments of one counter, per variant."""
    concurrency: int = 10
    """Increments running at once (one session each)."""
    pause: float = 0.002
    """Seconds between a task's read and its write."""
    jobs: int = 100
    """Jobs in the SKIP LOCKED queue."""
    contrast_jobs: int = 30
    """Jobs in the plain FOR UPDATE queue (the contrast)."""
    workers: int = 5
    """Queue workers (one session each)."""
    batch: int = 1
    """Jobs a worker claims per transaction."""
    work: float = 0.002
    """Seconds a worker works on its claimed jobs, holding their row locks."""

    def __post_init__(self) -> None:
        if self.concurrency < 2 or self.increments < self.concurrency:
            raise BadSizes(
                f"concurrency ({self.concurrency}) must be at least 2 and at most increments "
                f"({self.increments}): with one task at a time no update can be lost"
            )
        if self.workers < 2 or self.batch < 1:
            raise BadSizes(
                f"workers ({self.workers}) must be at least 2 and batch ({self.batch}) at "
                "least 1: one worker has no one to wait for"
            )
        if self.jobs < self.workers * self.batch or self.contrast_jobs < 1:
            raise BadSizes(
                f"jobs ({self.jobs}) must be at least workers x batch "
                f"({self.workers * self.batch}), or some worker cannot get work; "
                f"contrast_jobs ({self.contrast_jobs}) at least 1"
            )


run = experiment(9, "Lost updates, row locks and a SKIP LOCKED queue", Sizes)

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


# --- the engine, and what the lock-wait sampler sees ----------------------------------------


@dataclass(frozen=True)
class Contention:
    """The experiment's engine (lock waits bounded) and its session factory."""

    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]


@asynccontextmanager
async def contention(lab: Lab[Sizes]) -> AsyncIterator[Contention]:
    """An engine of ``max(concurrency, workers)`` connections (no overflow) whose lock
    waits are bounded.

    ``lock_timeout`` / ``statement_timeout`` are startup settings of each connection
    (``server_settings``): a ``SET`` inside the driver's implicit transaction would be
    undone by the pool's reset ROLLBACK. Its connections carry ``application_name =
    lab.tag``, which the lock-wait sampler counts.
    """
    engine = lab.engine_with(
        pool_size=max(lab.sizes.concurrency, lab.sizes.workers),
        max_overflow=0,
        pool_timeout=30,
        pool_pre_ping=False,
        server_settings={"lock_timeout": LOCK_TIMEOUT, "statement_timeout": STATEMENT_TIMEOUT},
    )
    sessions = lab.sessions_on(engine)
    for _ in range(2):  # the second checkout comes after the pool's reset (a ROLLBACK)
        async with sessions() as session:
            lock_timeout = await session.scalar(text("SHOW lock_timeout"))
    if lock_timeout != LOCK_TIMEOUT:
        raise RuntimeError(f"lock_timeout is {lock_timeout!r} on the pool's connections")
    lab.note(
        f"Lock waits are bounded on every connection of this experiment's engine: "
        f"lock_timeout = {LOCK_TIMEOUT}, statement_timeout = {STATEMENT_TIMEOUT}."
    )
    yield Contention(engine, sessions)


@dataclass(frozen=True)
class LockWaitSample:
    """One look at ``pg_stat_activity``: this run's backends waiting on a heavyweight lock."""

    at: float
    """``time.perf_counter()`` when the answer was in."""
    waits: dict[str, int]
    """Backends waiting, by ``wait_event`` (``transactionid``, ``tuple``, ``extend``...)."""


async def lock_waits(lab: Lab[Sizes]) -> LockWaitSample:
    """The sampler's probe: one sample, on its own connection of the shared engine (another
    application_name, so it never counts itself), in a transaction of its own
    (pg_stat_activity is a snapshot taken once per transaction)."""
    async with lab.engine.connect() as conn:
        rows = (await conn.execute(_LOCK_WAITERS, {"app": lab.tag})).all()
    return LockWaitSample(time.perf_counter(), {str(kind): int(n) for kind, n in rows})


def lock_sampler(lab: Lab[Sizes]) -> probes.Sampler[LockWaitSample]:
    return probes.Sampler(partial(lock_waits, lab), every=0.005, within=PHASE_TIMEOUT)


@dataclass(frozen=True)
class LockWaits:
    """What the samples say about row-lock waits."""

    samples: Sequence[LockWaitSample]

    def row_lock_waiters(self) -> list[int]:
        """Backends waiting on a row lock, sample by sample."""
        return [
            sum(n for kind, n in s.waits.items() if kind in ROW_LOCK_WAITS) for s in self.samples
        ]

    @property
    def most(self) -> int:
        """Most backends seen waiting on a row lock in one sample."""
        return probes.peak(self.row_lock_waiters())

    @property
    def seen(self) -> int:
        """Samples with at least one row-lock waiter."""
        return sum(n > 0 for n in self.row_lock_waiters())

    def kinds(self, *, row_locks: bool) -> dict[str, int]:
        """Samples that saw each kind of lock wait: the row-lock kinds, or the others."""
        found = Counter(
            kind for s in self.samples for kind in s.waits if (kind in ROW_LOCK_WAITS) == row_locks
        )
        return dict(sorted(found.items()))

    def during(self, start: float, end: float) -> int:
        """Samples whose answer came in between ``start`` and ``end``."""
        return sum(start <= s.at <= end for s in self.samples)


def others(kinds: dict[str, int]) -> str:
    """The other lock waits seen, e.g. ``extend in 1 sample(s)``, or ``none``."""
    return ", ".join(f"{kind} in {n} sample(s)" for kind, n in kinds.items()) or "none"


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
class Counted:
    """One variant hammering its own counter: the final value and the tasks' errors."""

    final: int
    errors: list[str]
    updates: int
    """UPDATE statements sent on the counter's row while the tasks ran."""


async def hammer(lab: Lab[Sizes], name: str, increment: Increment, *, key: str) -> Counted:
    """A counter of its own for variant ``name`` (a user row, ``counter-<key>``), incremented
    ``increments`` times by ``concurrency`` tasks at once on the contention engine."""
    size = lab.sizes
    ctx = await lab.use(contention)
    async with lab.sessions.begin() as session:
        uid = (
            await session.scalars(
                insert(User).returning(User.id), [{"username": lab.name(f"counter-{key}")}]
            )
        ).one()
    with lab.timed(f"{name}: {size.increments} increments"), lab.statements(ctx.engine) as sent:
        one = partial(increment, ctx.sessions, uid, size.pause)
        errors = await run_concurrently(size.increments, size.concurrency, one)
    async with lab.sessions() as session:
        final = (await session.execute(select(User.login_count).where(User.id == uid))).scalar_one()
    return Counted(final, errors, sum(s.startswith("UPDATE users") for s in sent))


NO_ERROR = "No task hit lock_timeout or any other error."


@run.scenario
async def naive_read_modify_write(lab: Lab[Sizes]) -> None:
    """Concurrent tasks each get() the counter, pause, add 1 in Python and commit."""
    n = lab.sizes.increments
    naive = await hammer(lab, "naive", naive_increment, key="naive")
    lab.figure("naive: lost updates", n - naive.final, f"of {n}")
    lab.check(
        "naive read-modify-write loses updates",
        "session.get(), login_count += 1, commit() from concurrent tasks (a short pause between "
        "read and write) ends below the number of increments: under READ COMMITTED the second "
        "UPDATE waits for the first, then overwrites it with a value computed from a stale read. "
        + NO_ERROR,
        expected={"UPDATEs sent": n, "final count": between(1, n - 1), "errors": []},
        observed={
            "UPDATEs sent": naive.updates,
            "final count": naive.final,
            "errors": naive.errors,
        },
    )


@run.scenario
async def select_for_update(lab: Lab[Sizes]) -> None:
    """The same with the read as select(...).with_for_update(), pg_stat_activity sampled
    for backends waiting on the row lock meanwhile."""
    n = lab.sizes.increments
    async with lock_sampler(lab) as sampler:
        locked = await hammer(lab, "for update", locked_increment, key="locked")
    waits = LockWaits(sampler.samples)
    lab.figure("for update: most backends waiting on the row lock", waits.most, "backends")
    lab.figure("for update: samples with a row-lock waiter", waits.seen, f"of {len(waits.samples)}")
    lab.check(
        "with_for_update(): exact, tasks queue on the row lock",
        "select(User).with_for_update() locks the row at the read, so the read-modify-write "
        "cycles run one after another: the count is exact, and the other tasks are seen in "
        "pg_stat_activity waiting on the row lock (wait_event_type = 'Lock', wait_event "
        "'transactionid' or 'tuple'). " + NO_ERROR,
        expected={
            "final count": n,
            "most backends waiting on the row lock": at_least(1),
            "errors": [],
        },
        observed={
            "final count": locked.final,
            "most backends waiting on the row lock": waits.most,
            "errors": locked.errors,
        },
    )


@run.scenario
async def read_then_for_update(lab: Lab[Sizes]) -> None:
    """A plain get() of the row, then a locking SELECT of it in the same session: with the
    first object kept, kept and populate_existing, and dropped before the lock."""
    n = lab.sizes.increments
    variants: dict[str, tuple[str, str, Increment]] = {  # check key: (figure label, row, how)
        "kept": (
            "read (kept), then for update",
            "kept",
            partial(read_then_lock, keep=True, populate=False),
        ),
        "kept + populate_existing": (
            "read (kept), then for update + populate_existing",
            "populated",
            partial(read_then_lock, keep=True, populate=True),
        ),
        "dropped": (
            "read (dropped), then for update",
            "dropped",
            partial(read_then_lock, keep=False, populate=False),
        ),
    }
    counted = {
        variant: await hammer(lab, label, increment, key=key)
        for variant, (label, key, increment) in variants.items()
    }
    kept = counted["kept"].final
    lab.figure("read (kept), then for update: lost updates", n - kept, f"of {n}")
    lab.check(
        "FOR UPDATE after a plain read keeps the stale attributes",
        "When the session still holds the object from a plain get() made before the locking "
        "SELECT, SELECT ... FOR UPDATE waits for the lock and fetches the current row, but the "
        "ORM does not overwrite attributes it already loaded (sqlalchemy#4774, #5572): updates "
        "are lost in spite of the lock. execution_options(populate_existing=True) makes it "
        "exact; so does dropping the first object (the identity map holds it weakly, the "
        "locking SELECT then loads a new one), which is why the bug comes and goes. " + NO_ERROR,
        expected={
            "UPDATEs sent (each variant)": [n, n, n],
            "kept": between(1, n - 1),
            "kept + populate_existing": n,
            "dropped": n,
            "errors": [],
        },
        observed={
            "UPDATEs sent (each variant)": [c.updates for c in counted.values()],
            **{variant: c.final for variant, c in counted.items()},
            "errors": [f"{variant}: {e}" for variant, c in counted.items() for e in c.errors],
        },
    )


@run.scenario
async def atomic_update(lab: Lab[Sizes]) -> None:
    """No read: update(User).values(login_count=User.login_count + 1), the SQL recorded."""
    n = lab.sizes.increments
    ctx = await lab.use(contention)
    with lab.statements(ctx.engine) as sent:
        atomic = await hammer(lab, "atomic update", atomic_increment, key="atomic")
    updates = [s for s in sent if s.startswith("UPDATE users")]
    lab.check(
        "atomic UPDATE ... SET n = n + 1: exact",
        "update(User).values(login_count=User.login_count + 1) sends the arithmetic to the "
        "server, which applies it to the latest committed row version: exact, with no read. "
        + NO_ERROR,
        expected={
            "final count": n,
            "UPDATE statements": n,
            "of which SET login_count=(users.login_count + ...)": n,
            "errors": [],
        },
        observed={
            "final count": atomic.final,
            "UPDATE statements": len(updates),
            "of which SET login_count=(users.login_count + ...)": sum(
                "login_count +" in s for s in updates
            ),
            "errors": atomic.errors,
        },
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


@run.scenario
async def version_column_with_retry(lab: Lab[Sizes]) -> None:
    """Naive read-modify-write of Job.attempts, a version_id_col row: each StaleDataError
    is retried in a new session after a random pause."""
    size = lab.sizes
    n = size.increments
    ctx = await lab.use(contention)
    async with lab.sessions.begin() as session:
        job_id = (
            await session.scalars(insert(Job).returning(Job.id), [{"queue": lab.name("counter")}])
        ).one()
    record = Versioned()
    with lab.timed(f"version column: {n} increments"):
        errors = await run_concurrently(
            n,
            size.concurrency,
            partial(
                versioned_increment,
                ctx.sessions,
                job_id,
                size.pause,
                record,
                backoff=size.pause * size.concurrency,
                max_tries=n * 10,
            ),
        )
    async with lab.sessions() as session:
        row = (
            await session.execute(select(Job.attempts, Job.version).where(Job.id == job_id))
        ).one()
    lab.figure("version column: StaleDataErrors", len(record.stale), "errors")
    lab.figure("version column: tries per increment", record.tries / n, "x")
    lab.check(
        "version column: a concurrent update raises StaleDataError",
        "With version_id_col the ORM's UPDATE carries WHERE version = <loaded>; when another "
        "transaction committed first, that UPDATE matches 0 rows and commit() raises "
        "sqlalchemy.orm.exc.StaleDataError instead of overwriting.",
        expected={"StaleDataErrors": at_least(1), "messages": [STALE_MESSAGE]},
        observed={"StaleDataErrors": len(record.stale), "messages": sorted(set(record.stale))},
    )
    lab.check(
        "version column + retry: exact",
        "Retrying each StaleDataError in a new session until the UPDATE matches gives the exact "
        "count; the version moved once per successful UPDATE. No task hit lock_timeout or any "
        "error other than the StaleDataErrors caught for the retry.",
        expected={"attempts": n, "version": n + 1, "errors": []},
        observed={"attempts": row.attempts, "version": row.version, "errors": errors},
    )


# --- the queue ----------------------------------------------------------------------------


@dataclass
class QueueRun:
    claims: list[tuple[int, str]] = field(default_factory=list)  # (job id, worker), committed
    seconds: float = 0.0
    started: float = 0.0
    errors: list[str] = field(default_factory=list)
    sent: list[str] = field(default_factory=list)
    waits: LockWaits = field(default_factory=lambda: LockWaits([]))

    def samples_while_working(self) -> int:
        return self.waits.during(self.started, self.started + self.seconds)


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


async def run_queue(lab: Lab[Sizes], queue: str, *, jobs: int, skip_locked: bool) -> QueueRun:
    """Queue ``jobs`` jobs, then let ``workers`` workers drain them, pg_stat_activity
    sampled for lock waits meanwhile."""
    size = lab.sizes
    ctx = await lab.use(contention)
    async with lab.sessions.begin() as session:
        await session.execute(
            insert(Job), [{"queue": queue, "payload": {"n": i}} for i in range(jobs)]
        )
    found = QueueRun()
    with lab.statements(ctx.engine) as sent:
        async with lock_sampler(lab) as sampler, asyncio.timeout(PHASE_TIMEOUT):
            found.started = time.perf_counter()
            results = await asyncio.gather(
                *(
                    work_queue(
                        ctx.sessions,
                        queue,
                        f"worker-{w}",
                        batch=size.batch,
                        work=size.work,
                        skip_locked=skip_locked,
                        claims=found.claims,
                        max_rounds=jobs + 1,
                    )
                    for w in range(size.workers)
                ),
                return_exceptions=True,
            )
            found.seconds = time.perf_counter() - found.started
    found.waits = LockWaits(sampler.samples)
    found.sent = [s for s in sent if "FOR UPDATE" in s]
    found.errors = [describe(r) for r in results if isinstance(r, BaseException)]
    return found


async def audit_queue(lab: Lab[Sizes], queue: str, run: QueueRun) -> dict[str, object]:
    """The claims recorded in memory beside what the table says of the same jobs."""
    async with lab.sessions() as session:
        rows = (
            await session.execute(
                select(Job.id, Job.status, Job.attempts, Job.locked_by).where(Job.queue == queue)
            )
        ).all()
    claimed = dict(run.claims)
    ids = {r.id for r in rows}
    return {
        "claims committed": len(run.claims),
        "jobs claimed twice": len(run.claims) - len(claimed),
        "jobs in the table": len(rows),
        "jobs nobody claimed": sorted(ids - claimed.keys()),
        "claims of jobs not in the table": sorted(claimed.keys() - ids),
        "done": sum(r.status is JobStatus.done for r in rows),
        "jobs by attempts": dict(sorted(Counter(r.attempts for r in rows).items())),
        "locked_by = the claimer": sum(claimed.get(r.id) == r.locked_by for r in rows),
        "errors": run.errors,
    }


def once_each(jobs: int) -> dict[str, object]:
    """What :func:`audit_queue` says when every one of ``jobs`` jobs was done exactly once."""
    return {
        "claims committed": jobs,
        "jobs claimed twice": 0,
        "jobs in the table": jobs,
        "jobs nobody claimed": [],
        "claims of jobs not in the table": [],
        "done": jobs,
        "jobs by attempts": {1: jobs},
        "locked_by = the claimer": jobs,
        "errors": [],
    }


@asynccontextmanager
async def throughputs(lab: Lab[Sizes]) -> AsyncIterator[dict[str, float]]:
    """Jobs per second of each queue variant that ran, for the ratio figure."""
    yield {}


@run.scenario
async def skip_locked_queue(lab: Lab[Sizes]) -> None:
    """Workers claim jobs with with_for_update(skip_locked=True), work holding the row
    locks, mark them done; the claims are audited against the table."""
    size = lab.sizes
    skip = await run_queue(lab, lab.tag, jobs=size.jobs, skip_locked=True)
    lab.check(
        "SKIP LOCKED queue: every job done exactly once",
        f"{size.workers} workers claiming with with_for_update(skip_locked=True): every job is "
        "claimed by exactly one worker (claims recorded in memory agree with status, attempts "
        "and locked_by in the table).",
        expected=once_each(size.jobs),
        observed=await audit_queue(lab, lab.tag, skip),
    )
    per = Counter(name for _, name in skip.claims)
    spread = [per.get(f"worker-{w}", 0) for w in range(size.workers)]
    lab.figure("SKIP LOCKED: fewest jobs for one worker", min(spread), "jobs")
    lab.figure("SKIP LOCKED: most jobs for one worker", max(spread), "jobs")
    lab.check(
        "SKIP LOCKED queue: every worker gets work",
        "The claim renders as ... FOR UPDATE SKIP LOCKED, and each worker skips the rows the "
        "others hold locked instead of waiting: all workers process jobs.",
        expected={
            "claim statements": each(matches("FOR UPDATE SKIP LOCKED$")),
            "jobs per worker": each(at_least(1)),
        },
        observed={"claim statements": sorted(set(skip.sent)), "jobs per worker": spread},
    )
    other = skip.waits.kinds(row_locks=False)
    lab.note(f"Other lock waits (not row locks) seen under SKIP LOCKED: {others(other)}.")
    lab.check(
        "SKIP LOCKED never waits on a row lock",
        "Sampling pg_stat_activity while the workers run: with SKIP LOCKED no worker is ever "
        "seen waiting on a row lock (wait_event 'transactionid' or 'tuple'). Other lock waits "
        "are reported, not counted (e.g. 'extend': two backends growing the same table or "
        "index file at once).",
        expected={
            "samples while the workers ran": at_least(3),
            "row-lock waits seen (samples, by kind)": {},
        },
        observed={
            "samples while the workers ran": skip.samples_while_working(),
            "row-lock waits seen (samples, by kind)": skip.waits.kinds(row_locks=True),
        },
    )
    lab.figure(f"SKIP LOCKED: {size.jobs} jobs drained", skip.seconds, "s")
    rate = size.jobs / skip.seconds
    (await lab.use(throughputs))["SKIP LOCKED"] = rate
    lab.figure("SKIP LOCKED throughput", rate, "jobs/s")


@run.scenario
async def plain_for_update_queue(lab: Lab[Sizes]) -> None:
    """The same workers and loop on a queue of their own, claiming with a plain
    with_for_update() (no SKIP LOCKED)."""
    size = lab.sizes
    queue = lab.name("for-update")
    plain = await run_queue(lab, queue, jobs=size.contrast_jobs, skip_locked=False)
    lab.check(
        "plain FOR UPDATE makes workers queue",
        "The same loop with plain FOR UPDATE has workers waiting on the first queued row "
        "(coleifer/huey#817: 'all workers take turns'), seen in pg_stat_activity as a "
        "row-lock wait (wait_event 'transactionid' or 'tuple').",
        expected={"most workers waiting on a row lock": at_least(1)},
        observed={"most workers waiting on a row lock": plain.waits.most},
    )
    lab.check(
        "plain FOR UPDATE queue: every job done exactly once",
        "Taking turns, it still processes every job once (claims recorded in memory agree "
        "with status, attempts and locked_by in the table).",
        expected=once_each(size.contrast_jobs),
        observed=await audit_queue(lab, queue, plain),
    )
    lab.figure(f"plain FOR UPDATE: {size.contrast_jobs} jobs drained", plain.seconds, "s")
    rate = size.contrast_jobs / plain.seconds
    lab.figure("plain FOR UPDATE throughput", rate, "jobs/s")
    lab.figure(
        "plain FOR UPDATE: samples with a row-lock waiter",
        plain.waits.seen,
        f"of {len(plain.waits.samples)}",
    )
    rates = await lab.use(throughputs)
    if "SKIP LOCKED" in rates:
        lab.figure(
            "SKIP LOCKED throughput / plain FOR UPDATE throughput", rates["SKIP LOCKED"] / rate, "x"
        )
