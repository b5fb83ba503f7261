"""Can a loader task and a reader task that depends on its rows run at the same time,
each with its own AsyncSession, and what happens when they share one?

Two tasks run under ``asyncio.gather``: the loader inserts users in batches,
committing each batch; the reader waits for each user to appear and then
inserts that user's track points. Each task has its own ``AsyncSession``.
Then the same two tasks share one session.

Sources: SQLAlchemy docs, "Asynchronous I/O (asyncio)" — "Using AsyncSession
with Concurrent Tasks": a single ``AsyncSession`` is not safe for use in
concurrent tasks; use one session per task.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from .lab import (
    BadSizes,
    Lab,
    at_least,
    describe,
    experiment,
    on,
    one_transaction,
    outcome,
    prefix,
    probes,
)
from .models import TrackPoint, User


@dataclass(frozen=True)
class Sizes:
    users: int = 200
    """Users the loader inserts."""
    batch: int = 20
    """Users per loader transaction."""
    points: int = 5
    """Track points the reader adds per user."""
    pause: float = 0.01
    """Seconds the loader holds each batch flushed but not committed."""
    poll: float = 0.002
    """Seconds between the reader's polls for a user not visible yet."""

    def __post_init__(self) -> None:
        if self.batch < 1:
            raise BadSizes(f"batch ({self.batch}) must be at least 1")
        if self.users <= self.batch:
            raise BadSizes(
                f"users ({self.users}) must be more than batch ({self.batch}): with one "
                "batch the reader cannot commit before the loader is done"
            )


run = experiment(1, "Concurrent loader and dependent reader", Sizes)


@dataclass
class Trace:
    """Event times (``time.perf_counter``) the two tasks record as they go."""

    commit_sent: dict[str, float] = field(default_factory=dict)
    flushed: dict[str, float] = field(default_factory=dict)
    first_seen: dict[str, float] = field(default_factory=dict)
    points_committed: list[float] = field(default_factory=list)
    polls_in_window: int = 0
    seen_in_window: int = 0
    probe_before_commit: int = 0
    probe_after_commit: int = 0
    loader_done: float = 0.0
    seconds: dict[str, float] = field(default_factory=dict)


async def load_users(
    session: AsyncSession,
    names: list[str],
    batch: int,
    pause: float,
    trace: Trace,
    probe: AsyncSession | None = None,
) -> None:
    """Insert users ``batch`` at a time: flush, hold the transaction open ``pause`` s, commit.

    With a ``probe`` session, count the batch as another session sees it just
    before and just after each COMMIT.
    """
    started = time.perf_counter()
    try:
        for start in range(0, len(names), batch):
            chunk = names[start : start + batch]
            session.add_all(User(username=name) for name in chunk)
            await session.flush()  # INSERTs sent, not committed yet
            now = time.perf_counter()
            trace.flushed.update(dict.fromkeys(chunk, now))
            await asyncio.sleep(pause)  # the reader polls in this window
            if probe is not None:
                trace.probe_before_commit += await count_visible(probe, chunk)
            # marked before the await: a reader answered from now on may see the batch
            trace.commit_sent.update(dict.fromkeys(chunk, time.perf_counter()))
            await session.commit()
            if probe is not None:
                trace.probe_after_commit += await count_visible(probe, chunk)
    finally:
        trace.loader_done = time.perf_counter()
        trace.seconds["loader"] = trace.loader_done - started


async def count_visible(session: AsyncSession, names: list[str]) -> int:
    return (
        await session.scalar(select(func.count()).select_from(User).where(User.username.in_(names)))
        or 0
    )


async def follow_users(
    session: AsyncSession,
    names: list[str],
    points: int,
    poll: float,
    trace: Trace,
    give_up_after: float = 10.0,
) -> None:
    """For each user in load order: poll until it is visible, then add its track points.

    Under READ COMMITTED every SELECT takes a new snapshot, so polling inside one
    open transaction does see the loader's later commits.
    """
    started = time.perf_counter()
    try:
        for name in names:
            deadline = time.perf_counter() + give_up_after
            while True:
                found = await session.scalar(select(User.id).where(User.username == name))
                # when the answer is in: a COMMIT sent after the SELECT was sent can still
                # precede its snapshot, so only an answer before the COMMIT was sent is early
                answered = time.perf_counter()
                in_window = name in trace.flushed and name not in trace.commit_sent
                trace.polls_in_window += in_window
                if found is not None:
                    trace.seen_in_window += in_window
                    trace.first_seen[name] = answered
                    break
                if answered > deadline:
                    raise TimeoutError(f"user {name} did not appear within {give_up_after} s")
                await asyncio.sleep(poll)
            session.add_all(
                TrackPoint(user_id=found, lat=48.85 + i / 1e4, lon=2.35, date=datetime.now(UTC))
                for i in range(points)
            )
            await session.commit()
            trace.points_committed.append(time.perf_counter())
    finally:
        trace.seconds["reader"] = time.perf_counter() - started


@run.scenario
async def one_session_per_task(lab: Lab[Sizes]) -> None:
    """A loader commits users in batches (flush, pause, commit) while a reader waits for
    each user and adds its track points, each task with its own session, under gather;
    a third session counts each batch just before and just after its COMMIT."""
    size = lab.sizes
    names = [lab.name(f"user-{i:05d}") for i in range(size.users)]
    trace = Trace()
    wall_started = time.perf_counter()
    async with (
        lab.sessions() as loader_session,
        lab.sessions() as reader_session,
        lab.sessions() as probe_session,
    ):
        results = await asyncio.gather(
            load_users(loader_session, names, size.batch, size.pause, trace, probe_session),
            follow_users(reader_session, names, size.points, size.poll, trace),
            return_exceptions=True,
        )
    wall = time.perf_counter() - wall_started
    lab.check(
        "one session per task: no error",
        "Two tasks with a session each run side by side without any error.",
        expected=[],
        observed=[describe(e) for e in results if isinstance(e, BaseException)],
    )
    async with lab.sessions() as session:
        mine = User.username.startswith(lab.tag)
        user_count = await session.scalar(select(func.count()).select_from(User).where(mine))
        point_count = await session.scalar(
            select(func.count()).select_from(TrackPoint).join(User).where(mine)
        )
    lab.check(
        "users and track points committed",
        "Every user the loader committed is in the table exactly once, with the `points` "
        "track points the reader added for it.",
        expected={"users": size.users, "track points": size.users * size.points},
        observed={"users": user_count, "track points": point_count},
    )
    lab.check(
        "other sessions see a batch only after COMMIT",
        "Users flushed (INSERT sent) but not committed are invisible to every other "
        "session; the same users are visible right after the COMMIT (READ COMMITTED).",
        expected={"visible before COMMIT": 0, "visible after": size.users},
        observed={
            "visible before COMMIT": trace.probe_before_commit,
            "visible after": trace.probe_after_commit,
        },
    )
    early = [
        n
        for n, seen in trace.first_seen.items()
        if n not in trace.commit_sent or seen < trace.commit_sent[n]
    ]
    lab.check(
        "the reader acted on committed users only",
        "The reader found each user only after the loader had sent that batch's COMMIT, "
        "and it did poll while a batch was flushed but not committed: none of those polls "
        "found the user.",
        expected={
            "users found before their COMMIT": 0,
            "polls in the flush-to-commit window": at_least(1),
            "of which found the user": 0,
        },
        observed={
            "users found before their COMMIT": len(early),
            "polls in the flush-to-commit window": trace.polls_in_window,
            "of which found the user": trace.seen_in_window,
        },
    )
    lab.check(
        "the tasks overlap",
        "The reader commits track points while the loader is still loading: the tasks "
        "interleave on the event loop instead of running one after the other.",
        expected=at_least(1),
        observed=sum(t < trace.loader_done for t in trace.points_committed),
    )
    parts = trace.seconds.get("loader", 0.0) + trace.seconds.get("reader", 0.0)
    lab.figure("loader task", trace.seconds.get("loader", 0.0), "s")
    lab.figure("reader task", trace.seconds.get("reader", 0.0), "s")
    lab.figure("wall time (gather)", wall, "s")
    lab.figure("sum of the parts / wall", parts / wall, "x")


@run.scenario
async def one_session_shared_by_two_tasks(lab: Lab[Sizes]) -> None:
    """The same loader and reader on ONE session: a fresh one, then one that already holds
    a connection (with and without pool_pre_ping). Each variant has a one-connection engine
    of its own, so what the misuse leaves in the pool is met by the next three sessions."""
    names = [lab.name(f"shared-{i}") for i in range(lab.sizes.batch)]
    fresh = await share_one_session(lab, names, "fresh", holding=False, pre_ping=True)
    pinged = await share_one_session(lab, names, "pinged", holding=True, pre_ping=True)
    unpinged = await share_one_session(lab, names, "unpinged", holding=True, pre_ping=False)
    lab.check(
        "one session shared by two tasks fails",
        "Sharing one AsyncSession between concurrent tasks is not serialised silently: "
        "a task gets an error, which one depends on whether the session already holds a "
        "connection and on the driver. A fresh session: SQLAlchemy's own guard. A session "
        "holding a connection: asyncpg refuses the second task's operation while one is in "
        "progress (InterfaceError); psycopg's AsyncConnection queues it behind a lock instead, "
        "so the driver lets both through and SQLAlchemy's session state machine catches the "
        "overlap (IllegalStateChangeError: commit() already in progress).",
        expected={
            "fresh session": prefix("InvalidRequestError"),
            "session holding a connection (pre-ping on)": on(
                asyncpg=prefix("InterfaceError"), psycopg=prefix("IllegalStateChangeError")
            ),
            "session holding a connection (pre-ping off)": on(
                asyncpg=prefix("InterfaceError"), psycopg=prefix("IllegalStateChangeError")
            ),
        },
        observed={
            "fresh session": fresh.error,
            "session holding a connection (pre-ping on)": pinged.error,
            "session holding a connection (pre-ping off)": unpinged.error,
        },
    )
    broken = prefix("InterfaceError: cannot use Connection.transaction()")
    lab.check(
        "with asyncpg the misuse breaks the pooled connection; only pre-ping replaces it",
        "Observed, not in the docs: on asyncpg, after the failure in a session that held a "
        "connection, that connection goes back to the pool broken (asyncpg still believes a "
        "transaction is open). With pool_pre_ping (this project's default) the next "
        "checkout's ping fails on it with that InterfaceError, which SQLAlchemy does not take "
        "for a disconnect: the error reaches the next session, and the pool invalidates the "
        "connection, so the session after works. Without pre-ping nothing replaces it: every "
        "later session on that pool fails. On psycopg the connection is returned clean (its "
        "lock serialised the two tasks' statements, the reset rolls back) and every later "
        "session works, with or without pre-ping.",
        expected=on(
            asyncpg={
                "pre-ping on: the next three sessions": [broken, "ok", "ok"],
                "pre-ping on: connections invalidated": 1,
                "pre-ping off: the next three sessions": [broken, broken, broken],
                "pre-ping off: connections invalidated": 0,
            },
            psycopg={
                "pre-ping on: the next three sessions": ["ok", "ok", "ok"],
                "pre-ping on: connections invalidated": 0,
                "pre-ping off: the next three sessions": ["ok", "ok", "ok"],
                "pre-ping off: connections invalidated": 0,
            },
        ),
        observed={
            "pre-ping on: the next three sessions": pinged.next_uses,
            "pre-ping on: connections invalidated": len(pinged.invalidated),
            "pre-ping off: the next three sessions": unpinged.next_uses,
            "pre-ping off: connections invalidated": len(unpinged.invalidated),
        },
    )


@dataclass
class SharedOutcome:
    error: str
    """What the two tasks sharing the session got (the first error)."""
    next_uses: list[str]
    """``ok`` or the error of each of the next three sessions on that engine."""
    invalidated: list[str]
    """The pool's ``invalidate`` events meanwhile (the exception type of each)."""


async def share_one_session(
    lab: Lab[Sizes], names: list[str], variant: str, *, holding: bool, pre_ping: bool
) -> SharedOutcome:
    """Run the loader and reader on ONE session of a one-connection engine (``holding``:
    the session has run a query first), then three more sessions on that engine."""
    engine = lab.one_connection(pool_pre_ping=pre_ping)
    invalidations = probes.Invalidations.on(engine)
    sessions = lab.sessions_on(engine)
    own = [f"{n}-{variant}" for n in names]
    async with sessions() as session:
        if holding:
            await session.execute(select(1))
        results = await asyncio.gather(
            load_users(session, own, max(1, len(own) // 4), 0.0, Trace()),
            follow_users(session, own, 1, 0.001, Trace(), give_up_after=5.0),
            return_exceptions=True,
        )
    errors = [e for e in results if isinstance(e, BaseException)]
    next_uses = [await outcome(one_transaction(sessions)) for _ in range(3)]
    return SharedOutcome(
        describe(errors[0]) if errors else "no error", next_uses, invalidations.seen
    )
