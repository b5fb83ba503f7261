"""Does stream_scalars() with yield_per really read through a server-side cursor,
deliver rows before the whole result is read, and keep memory bounded compared
with .all()?

``AsyncSession.stream_scalars()`` with ``yield_per`` reads through a
server-side cursor, so rows are handled in partitions while the rest of the
result is still on the server; ``joinedload`` of the many-to-one ``user``
comes along in the same rows. The alternative, ``(await
session.scalars(...)).all()``, buffers every row and object first. The
scenarios share one dataset (``points`` track points over ``users`` users).

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
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Select, insert, inspect, select, text
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.orm import joinedload

from .lab import (
    BadSizes,
    Lab,
    at_least,
    at_most,
    describe,
    each,
    experiment,
    less_than,
    on,
    prefix,
)
from .models import TrackPoint, User


@dataclass(frozen=True)
class Sizes:
    points: int = 5_000
    """Track points in the dataset (all of them are streamed, then read with .all())."""
    users: int = 20
    """Users the track points are spread over."""
    yield_per: int = 250
    """Rows per partition of the stream (execution option yield_per)."""

    def __post_init__(self) -> None:
        if self.users < 1 or self.yield_per < 1:
            raise BadSizes(f"users ({self.users}) and yield_per ({self.yield_per}) must be ≥ 1")
        if self.points <= self.yield_per:
            raise BadSizes(
                f"points ({self.points}) must be more than yield_per ({self.yield_per}): "
                "with a single partition the stream would show no partitioning"
            )


run = experiment(2, "Streaming a large result with yield_per", Sizes)

# named cursors/portals only: the query below runs in the unnamed portal itself
OPEN_CURSORS = text("SELECT count(*) FROM pg_cursors WHERE name <> ''")


def points_of(lab: Lab[Sizes]) -> Select[TrackPoint]:
    """The run's track points, each with its user joined in (many-to-one)."""
    return (
        select(TrackPoint)
        .join(TrackPoint.user)
        .where(User.username.startswith(lab.tag))
        .options(joinedload(TrackPoint.user))
        .order_by(TrackPoint.id)
    )


@asynccontextmanager
async def dataset(lab: Lab[Sizes]) -> AsyncIterator[None]:
    """``users`` users and ``points`` track points spread over them (Core insertmanyvalues),
    committed once for every scenario. The lab deletes them after the run (the users
    cascade to their points)."""
    size = lab.sizes
    start = datetime(2024, 5, 1, tzinfo=UTC)
    with lab.timed("seed (Core insert, insertmanyvalues)"):
        async with lab.sessions.begin() as session:
            ids = list(
                (
                    await session.scalars(
                        insert(User).returning(User.id),
                        [{"username": lab.name(f"walker-{i}")} for i in range(size.users)],
                    )
                ).all()
            )
            await session.execute(
                insert(TrackPoint),
                [
                    {
                        "user_id": ids[i % size.users],
                        "lat": 45.0 + (i % 1000) / 1e4,
                        "lon": 6.0 + (i // 1000) / 1e4,
                        "date": start + timedelta(seconds=i),
                    }
                    for i in range(size.points)
                ],
            )
    yield


@run.scenario
async def stream_in_partitions(lab: Lab[Sizes]) -> None:
    """Stream the track points with yield_per, partition by partition, asking pg_cursors
    during the stream, after it is exhausted and after COMMIT."""
    size = lab.sizes
    await lab.use(dataset)
    sizes: list[int] = []
    user_unloaded = inspected = cursors_during = 0
    first_partition_at = float("nan")
    async with lab.sessions() as session:
        started = time.perf_counter()
        result = await session.stream_scalars(
            points_of(lab).execution_options(yield_per=size.yield_per)
        )
        async for partition in result.partitions():
            if not sizes:
                first_partition_at = time.perf_counter() - started
                cursors_during = await session.scalar(OPEN_CURSORS) or 0
            sizes.append(len(partition))
            inspected += len(partition)
            user_unloaded += sum("user" in inspect(p).unloaded for p in partition)
        stream_seconds = time.perf_counter() - started
        cursors_exhausted = await session.scalar(OPEN_CURSORS) or 0
        await session.commit()
        cursors_after = await session.scalar(OPEN_CURSORS) or 0
    lab.check(
        "server-side cursor open while streaming",
        "While the stream is being read, the session's connection holds an open named "
        "cursor/portal (pg_cursors). What the exhausted stream leaves differs by driver: "
        "asyncpg's portal outlives it, living until the transaction ends, not until the "
        "last row is read (a long transaction keeps it); psycopg's named cursor is closed "
        "(CLOSE sent) when SQLAlchemy closes the exhausted result. Either way it is gone "
        "once the transaction ends.",
        expected={
            "named cursors during the stream": at_least(1),
            "after the last row, before COMMIT": on(asyncpg=at_least(1), psycopg=0),
            "after COMMIT": 0,
        },
        observed={
            "named cursors during the stream": cursors_during,
            "after the last row, before COMMIT": cursors_exhausted,
            "after COMMIT": cursors_after,
        },
    )
    lab.check(
        "rows arrive in yield_per partitions",
        "The stream hands rows over in partitions of at most yield_per rows, so the first "
        "rows are processed while the rest are still on the server.",
        expected={
            "partitions (more than one)": -(-size.points // size.yield_per),
            "rows per partition": each(at_most(size.yield_per)),
            "rows streamed": size.points,
        },
        observed={
            "partitions (more than one)": len(sizes),
            "rows per partition": sizes,
            "rows streamed": sum(sizes),
        },
    )
    lab.check(
        "joinedload works with yield_per (many-to-one)",
        "joinedload(TrackPoint.user) arrives in the same rows: no streamed point has its "
        "user unloaded (which would need a lazy load, i.e. MissingGreenlet in async).",
        expected={"points inspected": size.points, "with user unloaded": 0},
        observed={"points inspected": inspected, "with user unloaded": user_unloaded},
    )
    lab.figure("stream: first partition after", first_partition_at, "s")
    lab.figure("stream: whole result", stream_seconds, "s")


@run.scenario
async def memory_stream_versus_all(lab: Lab[Sizes]) -> None:
    """Peak Python memory (tracemalloc) of streaming the track points with yield_per, then
    of reading the same rows with .all()."""
    size = lab.sizes
    await lab.use(dataset)
    gc.collect()
    tracemalloc.start()
    try:
        streamed = 0
        first_partition_at = float("nan")
        async with lab.sessions() as session:
            started = time.perf_counter()
            result = await session.stream_scalars(
                points_of(lab).execution_options(yield_per=size.yield_per)
            )
            async for partition in result.partitions():
                if not streamed:
                    first_partition_at = time.perf_counter() - started
                streamed += len(partition)
        stream_peak = tracemalloc.get_traced_memory()[1]

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
        "streaming keeps memory bounded",
        "Peak Python memory while streaming (tracemalloc) is well below the peak of "
        "buffering the same rows with .all().",
        expected={
            "rows streamed": size.points,
            ".all() rows": size.points,
            "stream peak / .all() peak": less_than(0.5),
        },
        observed={
            "rows streamed": streamed,
            ".all() rows": buffered,
            "stream peak / .all() peak": stream_peak / max(all_peak, 1),
        },
    )
    lab.figure("stream: first partition after (tracemalloc on)", first_partition_at, "s")
    lab.figure(".all(): first row after (tracemalloc on)", all_first_row_at, "s")
    lab.figure("stream peak memory", stream_peak / 2**20, "MiB")
    lab.figure(".all() peak memory", all_peak / 2**20, "MiB")
    lab.figure(".all() peak / stream peak", all_peak / max(stream_peak, 1), "x")


@run.scenario
async def yield_per_refuses_joined_collection(lab: Lab[Sizes]) -> None:
    """Stream the users with joinedload of their track points (one-to-many) and yield_per."""
    await lab.use(dataset)
    async with lab.sessions() as session:
        try:
            result = await session.stream_scalars(
                select(User)
                .where(User.username.startswith(lab.tag))
                .options(joinedload(User.track_points))
                .execution_options(yield_per=lab.sizes.yield_per)
            )
            async for _ in result:
                pass
        except InvalidRequestError as exc:
            refused = describe(exc)
        else:
            refused = "no error: the rows streamed"
    lab.check(
        "yield_per refuses joinedload of a collection",
        "Joined eager loading of a one-to-many collection cannot be combined with "
        "yield_per (a parent's rows could straddle partitions): SQLAlchemy raises.",
        expected=prefix("InvalidRequestError"),
        observed=refused,
    )
