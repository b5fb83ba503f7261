"""What the server says about our connections, and what a pool says about its own.

Each server probe runs on its own short connection from the engine given
(usually ``lab.engine``), so it never disturbs the sessions it observes; and
since ``pg_stat_activity`` is a snapshot taken once per transaction, a new
connection (a new transaction) per call is also what lets repeated calls see
the server change. :func:`poll` and :class:`Sampler` repeat a probe, bounded in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.pool import QueuePool

T = TypeVar("T")

SLEEPING = "%pg_sleep%"
"""``query_like`` of a backend running ``pg_sleep``: how experiments make a query last."""

_BACKENDS = text(
    """
    SELECT count(*) FROM pg_stat_activity
    WHERE datname = current_database()
      AND pid <> pg_backend_pid()
      AND application_name = :app
      AND (CAST(:state AS text) IS NULL OR state = :state)
      AND (CAST(:query AS text) IS NULL OR query LIKE :query)
    """
)


async def backends(
    engine: AsyncEngine,
    application_name: str,
    *,
    state: str | None = None,
    query_like: str | None = None,
) -> int:
    """Server connections with this ``application_name`` (optionally in ``state`` /
    running a query ``LIKE query_like``), the probe's own connection excluded."""
    async with engine.connect() as conn:
        found = await conn.scalar(
            _BACKENDS, {"app": application_name, "state": state, "query": query_like}
        )
    return int(found or 0)


async def sleepers(engine: AsyncEngine, application_name: str) -> int:
    """Backends of ``application_name`` that are running a ``pg_sleep`` right now."""
    return await backends(engine, application_name, state="active", query_like=SLEEPING)


async def settle(engine: AsyncEngine, application_name: str, want: int, *, within: float) -> int:
    """Poll the server's count of ``application_name``'s connections until it is ``want``
    (or ``within`` seconds are up); the last count."""
    found = await poll(
        lambda: backends(engine, application_name), lambda n: n == want, within=within
    )
    return found.value


async def wait_sleepers(
    engine: AsyncEngine,
    application_name: str,
    until: Callable[[int], bool],
    *,
    within: float,
    every: float = 0.02,
) -> Polled[int]:
    """Poll how many of ``application_name``'s backends run ``pg_sleep`` until ``until``
    holds (``lambda n: n == 0``: the query is gone; ``n > 0``: it started)."""
    return await poll(lambda: sleepers(engine, application_name), until, within=within, every=every)


def sleepers_sampler(
    engine: AsyncEngine, application_name: str, *, every: float, within: float
) -> Sampler[int]:
    """A :class:`Sampler` of how many of ``application_name``'s backends run ``pg_sleep``."""
    return Sampler(lambda: sleepers(engine, application_name), every=every, within=within)


async def backend_pid(session: AsyncSession | AsyncConnection) -> int:
    """``pg_backend_pid()`` of the connection the session (or connection) is on."""
    return int(await session.scalar(text("SELECT pg_backend_pid()")) or 0)


@dataclass
class Invalidations:
    """What the pool's ``invalidate`` event reported: one exception type name (or "None")
    per invalidated connection, from :meth:`on` on."""

    seen: list[str] = field(default_factory=list)

    @classmethod
    def on(cls, engine: AsyncEngine) -> Invalidations:
        found = cls()

        def record(dbapi_connection: Any, record: Any, exception: BaseException | None) -> None:
            found.seen.append(type(exception).__name__ if exception is not None else "None")

        event.listen(engine.sync_engine.pool, "invalidate", record)
        return found


async def backend_pids(engine: AsyncEngine, application_name: str) -> list[int]:
    """PIDs of the server processes behind this ``application_name``'s connections."""
    async with engine.connect() as conn:
        rows = await conn.scalars(
            text(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND application_name = :app ORDER BY pid"
            ),
            {"app": application_name},
        )
        return list(rows)


async def live_pids(engine: AsyncEngine, pids: Sequence[int]) -> list[int]:
    """Which of these server processes still exist (any ``application_name``)."""
    async with engine.connect() as conn:
        found = await conn.scalars(
            text("SELECT pid FROM pg_stat_activity WHERE pid = ANY(:pids) ORDER BY pid"),
            {"pids": list(pids)},
        )
        return list(found)


async def terminate(engine: AsyncEngine, pid: int, *, wait: float) -> bool:
    """``pg_terminate_backend(pid, timeout)``: True once that process has exited, which
    the server waits for up to ``wait`` seconds."""
    async with engine.connect() as conn:
        done = await conn.scalar(
            text("SELECT pg_terminate_backend(:pid, :ms)"), {"pid": pid, "ms": int(wait * 1000)}
        )
    return bool(done)


def queue_pool(engine: AsyncEngine) -> QueuePool:
    """``engine.pool``, which must be a ``QueuePool`` (the default for an AsyncEngine)."""
    pool = engine.pool
    if not isinstance(pool, QueuePool):
        raise TypeError(f"expected a QueuePool, the engine has {type(pool).__name__}")
    return pool


def checked_out(engine: AsyncEngine) -> int:
    """Connections of ``engine``'s pool currently handed out (not returned)."""
    return queue_pool(engine).checkedout()


@dataclass(frozen=True)
class Polled(Generic[T]):
    """What :func:`poll` ended with."""

    value: T
    """The last value the probe returned."""
    held: bool
    """Whether ``until(value)`` held (else the time was up)."""
    seconds: float
    """From the start until that last value was in."""


async def poll(
    probe: Callable[[], Awaitable[T]],
    until: Callable[[T], bool],
    *,
    within: float,
    every: float = 0.05,
) -> Polled[T]:
    """Await ``probe()`` every ``every`` seconds until ``until(value)`` holds or more than
    ``within`` seconds have passed; the probe runs at least once."""
    started = time.perf_counter()
    while True:
        value = await probe()
        waited = time.perf_counter() - started
        held = until(value)
        if held or waited > within:
            return Polled(value, held, waited)
        await asyncio.sleep(every)


class Sampler(Generic[T]):
    """``probe()`` sampled in the background every ``every`` seconds, from the moment
    it is made until :meth:`stop` (or for ``within`` seconds at most); every sample kept.

    ``async with Sampler(probe, every=0.02, within=30) as seen: ...`` stops it when the
    block ends. The probe runs at least once, so ``samples`` is never empty after
    :meth:`stop`; an experiment that needs the sampler to have seen a phase checks
    ``len(seen.samples)``.
    """

    def __init__(self, probe: Callable[[], Awaitable[T]], *, every: float, within: float) -> None:
        self.samples: list[T] = []
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._sample(probe, every, within))

    async def _sample(self, probe: Callable[[], Awaitable[T]], every: float, within: float) -> None:
        deadline = time.perf_counter() + within
        while True:
            self.samples.append(await probe())
            if self._stop.is_set() or time.perf_counter() >= deadline:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), every)

    async def stop(self) -> list[T]:
        """Stop sampling (after one last sample) and return every sample taken."""
        self._stop.set()
        await self._task
        return self.samples

    async def __aenter__(self) -> Sampler[T]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if exc_info[0] is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            return
        await self.stop()


def peak(samples: Sequence[int]) -> int:
    """The highest of ``samples`` (0 for none)."""
    return max(samples, default=0)
