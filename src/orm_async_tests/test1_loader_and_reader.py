"""Experiment 1: a concurrent loader and a dependent reader (the seed's first script).

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

from .db import create_session_factory
from .harness import Lab, describe, experiment, one_transaction, outcome
from .models import TrackPoint, User


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


@experiment(1, "Concurrent loader and dependent reader")
async def run(
    lab: Lab,
    *,
    users: int = 200,
    batch: int = 20,
    points: int = 5,
    pause: float = 0.01,
    poll: float = 0.002,
) -> None:
    """Can a loader task and a reader task that depends on its rows run at the same time,
    each with its own AsyncSession, and what happens when they share one?"""
    names = [f"{lab.tag}user-{i:05d}" for i in range(users)]
    trace = Trace()
    wall_started = time.perf_counter()
    async with (
        lab.sessions() as loader_session,
        lab.sessions() as reader_session,
        lab.sessions() as probe_session,
    ):
        results = await asyncio.gather(
            load_users(loader_session, names, batch, pause, trace, probe_session),
            follow_users(reader_session, names, points, poll, trace),
            return_exceptions=True,
        )
    wall = time.perf_counter() - wall_started
    errors = [describe(e) for e in results if isinstance(e, BaseException)]
    lab.check(
        "one session per task: no error",
        "Two tasks with a session each run side by side without any error.",
        expected="no exception",
        observed="; ".join(errors) or "no exception",
        passed=not errors,
    )

    async with lab.sessions() as session:
        user_count = await session.scalar(
            select(func.count()).select_from(User).where(User.username.startswith(lab.tag))
        )
        point_count = await session.scalar(
            select(func.count())
            .select_from(TrackPoint)
            .join(User)
            .where(User.username.startswith(lab.tag))
        )
    lab.check(
        "users committed",
        "Every user the loader committed is in the table, exactly once.",
        expected=users,
        observed=user_count,
    )
    lab.check(
        "track points committed",
        "The reader added `points` track points for every user it saw.",
        expected=users * points,
        observed=point_count,
    )
    lab.check(
        "other sessions see a batch only after COMMIT",
        "Users flushed (INSERT sent) but not committed are invisible to every other "
        "session; the same users are visible right after the COMMIT (READ COMMITTED).",
        expected=f"0 visible before, {users} after",
        observed=f"{trace.probe_before_commit} visible before, {trace.probe_after_commit} after",
        passed=trace.probe_before_commit == 0 and trace.probe_after_commit == users,
    )
    early = [
        n
        for n, seen in trace.first_seen.items()
        if n not in trace.commit_sent or seen < trace.commit_sent[n]
    ]
    lab.check(
        "the reader acted on committed users only",
        "The reader found each user only after the loader had sent that batch's COMMIT, "
        "including when it polled while the batch was flushed but not committed.",
        expected="0 users found before their COMMIT",
        observed=(
            f"{len(early)} users found before their COMMIT; {trace.seen_in_window} of "
            f"{trace.polls_in_window} polls in the flush-to-commit window found the user"
        ),
        passed=not early and trace.seen_in_window == 0,
    )
    while_loading = sum(t < trace.loader_done for t in trace.points_committed)
    lab.check(
        "the tasks overlap",
        "The reader commits track points while the loader is still loading: the tasks "
        "interleave on the event loop instead of running one after the other.",
        expected=f"> 0 of {users} reader commits before the loader finished",
        observed=f"{while_loading} of {len(trace.points_committed)}",
        passed=while_loading > 0,
    )
    parts = trace.seconds.get("loader", 0.0) + trace.seconds.get("reader", 0.0)
    lab.figure("loader task", trace.seconds.get("loader", 0.0), "s")
    lab.figure("reader task", trace.seconds.get("reader", 0.0), "s")
    lab.figure("wall time (gather)", wall, "s")
    lab.figure("sum of the parts / wall", parts / wall, "x")

    shared = await share_one_session(lab, names=[f"{lab.tag}shared-{i}" for i in range(batch)])
    lab.check(
        "one session shared by two tasks fails",
        "Sharing one AsyncSession between concurrent tasks is not serialised silently: "
        "a task gets an error, which one depends on whether the session already holds a "
        "connection (SQLAlchemy's own guard, or asyncpg's).",
        expected="an exception, in both variants",
        observed=" | ".join(f"{v}: {s.error}" for v, s in shared.items()),
        passed=all(s.error != "no error" for s in shared.values()),
    )
    holding = shared["session holding a connection"]
    lab.check(
        "the misuse breaks the pooled connection once",
        "Observed, not in the docs: after the failure in a session that held a connection, "
        "that connection goes back to the pool broken, so the next session that checks it "
        "out fails on its first transaction (pre-ping does not catch it); the pool then "
        "replaces it and the session after that works.",
        expected="next session: InterfaceError; the one after: ok",
        observed=f"next session: {holding.next_use}; the one after: {holding.after_that}",
        passed=holding.next_use.startswith("InterfaceError") and holding.after_that == "ok",
    )


@dataclass
class SharedOutcome:
    error: str
    next_use: str
    after_that: str


async def share_one_session(lab: Lab, names: list[str]) -> dict[str, SharedOutcome]:
    """Run the loader and reader on ONE session, with and without a connection already held.

    Each variant gets its own one-connection engine, so that whatever the misuse
    leaves in the pool is observed there and does not reach the shared engine.
    """
    found: dict[str, SharedOutcome] = {}
    for variant in ("fresh session", "session holding a connection"):
        engine = lab.engine_with(pool_size=1, max_overflow=0)
        sessions = create_session_factory(engine)
        own = [f"{n}-{len(found)}" for n in names]
        async with sessions() as session:
            if variant != "fresh session":
                await session.execute(select(1))
            results = await asyncio.gather(
                load_users(session, own, max(1, len(own) // 4), 0.0, Trace()),
                follow_users(session, own, 1, 0.001, Trace(), give_up_after=5.0),
                return_exceptions=True,
            )
        errors = [e for e in results if isinstance(e, BaseException)]
        error = describe(errors[0]) if errors else "no error"
        found[variant] = SharedOutcome(
            error,
            await outcome(one_transaction(sessions)),
            await outcome(one_transaction(sessions)),
        )
        await engine.dispose()
    return found
