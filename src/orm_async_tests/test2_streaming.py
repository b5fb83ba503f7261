"""Experiment 2: streaming a large result (the seed's second script).

``AsyncSession.stream_scalars()`` with ``yield_per`` reads through a
server-side cursor, so rows are handled in partitions while the rest of the
result is still on the server; ``joinedload`` of the many-to-one ``user``
comes along in the same rows. The alternative, ``(await
session.scalars(...)).all()``, buffers every row and object first.

Sources: SQLAlchemy docs, "Asynchronous I/O (asyncio)" — "Using AsyncSession
... streaming results" (``AsyncSession.stream``, ``stream_scalars``); ORM
querying guide, "Fetching Large Result Sets with Yield Per" (``yield_per`` is
not compatible with joined eager loading of collections); PostgreSQL docs,
``pg_cursors`` (lists cursors created by DECLARE and by the protocol's Bind).
"""

from __future__ import annotations

import gc
import time
import tracemalloc
from datetime import UTC, datetime, timedelta

from sqlalchemy import Select, insert, inspect, select, text
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import joinedload

from .harness import Lab, describe, experiment
from .models import TrackPoint, User

# named cursors/portals only: the query below runs in the unnamed portal itself
OPEN_CURSORS = text("SELECT count(*) FROM pg_cursors WHERE name <> ''")


def points_of(lab: Lab) -> Select[TrackPoint]:
    return (
        select(TrackPoint)
        .join(TrackPoint.user)
        .where(User.username.startswith(lab.tag))
        .options(joinedload(TrackPoint.user))
        .order_by(TrackPoint.id)
    )


async def seed(session: AsyncSession, lab: Lab, users: int, points: int) -> None:
    """``users`` users and ``points`` track points spread over them (Core insertmanyvalues)."""
    ids = list(
        (
            await session.scalars(
                insert(User).returning(User.id),
                [{"username": f"{lab.tag}walker-{i}"} for i in range(users)],
            )
        ).all()
    )
    start = datetime(2024, 5, 1, tzinfo=UTC)
    await session.execute(
        insert(TrackPoint),
        [
            {
                "user_id": ids[i % users],
                "lat": 45.0 + (i % 1000) / 1e4,
                "lon": 6.0 + (i // 1000) / 1e4,
                "date": start + timedelta(seconds=i),
            }
            for i in range(points)
        ],
    )


@experiment(2, "Streaming a large result with yield_per")
async def run(lab: Lab, *, points: int = 10_000, users: int = 20, yield_per: int = 500) -> None:
    """Does stream_scalars() with yield_per really read through a server-side cursor,
    deliver rows before the whole result is read, and keep memory bounded compared
    with .all()?"""
    async with lab.sessions.begin() as session:
        with lab.timed("seed (Core insert, insertmanyvalues)"):
            await seed(session, lab, users, points)

    # 1. stream, partition by partition, watching the server-side cursor
    gc.collect()
    tracemalloc.start()
    try:
        streamed = partitions = oversized = cursors_while = cursors_exhausted = 0
        users_loaded = True
        first_row_at = 0.0
        async with lab.sessions() as session:
            started = time.perf_counter()
            result = await session.stream_scalars(
                points_of(lab).execution_options(yield_per=yield_per)
            )
            async for partition in result.partitions():
                if partitions == 0:
                    first_row_at = time.perf_counter() - started
                    cursors_while = await session.scalar(OPEN_CURSORS) or 0
                partitions += 1
                oversized += len(partition) > yield_per
                streamed += len(partition)
                users_loaded &= all("user" not in inspect(p).unloaded for p in partition)
            stream_seconds = time.perf_counter() - started
            cursors_exhausted = await session.scalar(OPEN_CURSORS) or 0
            await session.commit()
            cursors_after = await session.scalar(OPEN_CURSORS) or 0
        stream_peak = tracemalloc.get_traced_memory()[1]

        # 2. the same rows with .all()
        gc.collect()
        tracemalloc.reset_peak()
        async with lab.sessions() as session:
            started = time.perf_counter()
            rows = (await session.scalars(points_of(lab))).all()
            all_first_row_at = time.perf_counter() - started
            buffered = len(rows)
            del rows
        all_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    lab.check(
        "server-side cursor open while streaming",
        "While the stream is being read, the session's connection holds an open named "
        "cursor/portal (pg_cursors); it is gone once the transaction ends.",
        expected="≥ 1 during, 0 after COMMIT",
        observed=f"{cursors_while} during, {cursors_after} after COMMIT",
        passed=cursors_while >= 1 and cursors_after == 0,
    )
    expected_partitions = -(-points // yield_per)
    lab.check(
        "rows arrive in yield_per partitions",
        "The stream hands rows over in partitions of at most yield_per rows, so the first "
        "rows are processed while the rest are still on the server.",
        expected=f"{expected_partitions} partitions of ≤ {yield_per} rows, {points} rows",
        observed=f"{partitions} partitions ({oversized} larger), {streamed} rows",
        passed=partitions == expected_partitions and oversized == 0 and streamed == points,
    )
    lab.check(
        "joinedload works with yield_per (many-to-one)",
        "joinedload(TrackPoint.user) arrives in the same rows: no streamed point has its "
        "user unloaded (which would need a lazy load, i.e. MissingGreenlet in async).",
        expected=True,
        observed=users_loaded,
    )
    lab.check(
        "streaming keeps memory bounded",
        "Peak Python memory while streaming (tracemalloc) is well below the peak of "
        "buffering the same rows with .all().",
        expected=f"stream peak < 1/2 of .all() peak; .all() got {points} rows",
        observed=f"{stream_peak / 2**20:.1f} MiB vs {all_peak / 2**20:.1f} MiB; "
        f".all() got {buffered} rows",
        passed=stream_peak < all_peak / 2 and buffered == points,
    )
    refused = await joined_collection_with_yield_per(lab, yield_per)
    lab.check(
        "yield_per refuses joinedload of a collection",
        "Joined eager loading of a one-to-many collection cannot be combined with "
        "yield_per (a parent's rows could straddle partitions): SQLAlchemy raises.",
        expected="InvalidRequestError",
        observed=refused,
        passed=refused.startswith("InvalidRequestError"),
    )
    lab.note(
        f"Named cursors still open after the stream was exhausted, before COMMIT: "
        f"{cursors_exhausted}. With asyncpg the server-side portal lives until the "
        "transaction ends, not until the last row is read; a long transaction keeps it."
    )
    lab.figure("stream: first partition after", first_row_at, "s")
    lab.figure(".all(): first row after", all_first_row_at, "s")
    lab.figure("stream: whole result", stream_seconds, "s")
    lab.figure("stream peak memory", stream_peak / 2**20, "MiB")
    lab.figure(".all() peak memory", all_peak / 2**20, "MiB")
    lab.figure(".all() peak / stream peak", all_peak / max(stream_peak, 1), "x")


async def joined_collection_with_yield_per(lab: Lab, yield_per: int) -> str:
    async with lab.sessions() as session:
        try:
            result = await session.stream_scalars(
                select(User)
                .where(User.username.startswith(lab.tag))
                .options(joinedload(User.track_points))
                .execution_options(yield_per=yield_per)
            )
            async for _ in result:
                pass
        except InvalidRequestError as exc:
            return describe(exc)
    return "no error: the rows streamed"
