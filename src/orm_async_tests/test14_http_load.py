"""Served by uvicorn and driven by concurrent HTTP clients, how do throughput and p50/p95
latency change with concurrency on a small pool and an adequate one, do the server's
connections stay within pool_size + max_overflow, what happens to a request's session used
in a BackgroundTask after the response (FastAPI >= 0.106), and does a request the client
abandons mid-query stop its query and return its connection?

The project's API (:mod:`orm_async_tests.api`) runs under a real uvicorn in a
child process on loopback (a free port), so server and clients do not share an
event loop; concurrent ``httpx.AsyncClient`` workers drive it. Each server
gets its pool size from the environment (``DB_POOL_SIZE``,
``DB_MAX_OVERFLOW``) and its own ``DB_APPLICATION_NAME``, so
``pg_stat_activity`` (sampled through ``lab.engine``) shows exactly that
server's connections. The server runs the project's app plus a router of the
experiment's own (:mod:`orm_async_tests.api.instrumented`, its ``make_app``):
a slow endpoint that holds its connection in ``pg_sleep`` and counts the
requests that found the pool full, the BackgroundTasks variants, and a state
endpoint that reports what the server saw. The two servers (a small pool and
an adequate one) are started once and shared by the scenarios; the last
scenario stops them.

1. Load: the same mix (slow endpoint, ``GET /users/{id}``, track-point pages)
   at concurrency 1, 10, 50 on a small pool and on an adequate one:
   throughput and p50/p95 latency are figures; the checks are structural (no
   error at any level, the server's connection count never above
   ``pool_size + max_overflow``, requests that found the pool full).
2. BackgroundTasks: a task that uses the request's session after the response,
   with the dependency in its default scope and with ``Depends(...,
   scope="function")``, and the right way (the task opens its own session from
   ``app.state.db.sessions``).
3. A client that gives up on a slow request (``pg_sleep``) after a fraction of
   a second: does the query stop, does the connection come back? And an
   endpoint that watches for the disconnect and cancels its query.
4. Shutdown: SIGTERM to both servers; does the lifespan exit run, and do their
   connections go with them?

What FastAPI does since 0.118 (observed with the version the report names, and in
its ``routing.request_response``):
the dependencies' exit stack is left only after ``await response(...)``, and a
Starlette response runs its background tasks inside that call, after the body
is sent. So a yield dependency in the default scope ("request") exits after
the background tasks: the 0.118.0 behaviour, not the 0.106.0 one; only
``Depends(..., scope="function")`` exits before the response, as every yield
dependency did in 0.106-0.117. And uvicorn does not cancel a request whose
client went away: it only marks the cycle disconnected, which the app sees
through ``receive()`` / ``Request.is_disconnected()`` if it looks.

Sources:

- FastAPI docs, "Dependencies with yield" (tutorial: the code after ``yield``
  runs after the response) and "Advanced Dependencies — Dependencies with
  yield, HTTPException, except and Background Tasks" (early exit and
  ``scope``); "Background Tasks" (tasks run after the response is sent).
- FastAPI release notes 0.106.0 ("Using resources from dependencies with yield
  in background tasks is no longer supported": the exit code moved before the
  response; PR fastapi/fastapi#10831), 0.118.0 (reverted so that a
  StreamingResponse can use the session: the exit code runs after the
  response is sent; PR #14099) and 0.121.0
  (``Depends(scope="function" | "request")``: ``"function"`` exits before the
  response; PR #14262). Issues/discussions: fastapi/fastapi#581 (sharing the
  request's DB session with a background task), #2866/#6871 (the exit code ran
  after background tasks "to be able to use the same DB session"), #11143,
  PR #14192 (closed: run background tasks after exiting the dependencies).
- fastapi/fastapi#3766 "How can I cancel the request handler gracefully when a
  client disconnects?" and uvicorn's ``h11_impl`` (``connection_lost`` marks
  the cycle disconnected and wakes ``receive()``; it does not cancel the
  request task); Kludex/uvicorn#2271; encode/starlette discussion #2094
  (``Request.is_disconnected()`` and ``BaseHTTPMiddleware``).
- SQLAlchemy docs, "Connection Pooling" (``QueuePool``: ``pool_size``,
  ``max_overflow``, ``pool_timeout``; a checkout waits when ``pool_size +
  max_overflow`` connections are out) and "Asynchronous I/O" (one
  ``AsyncSession`` per request/task).
"""

from __future__ import annotations

import asyncio
import signal
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select

from .lab import (
    BadSizes,
    Lab,
    between,
    contains,
    describe,
    experiment,
    free_port,
    more_than,
    prefix,
    probes,
    server,
)
from .models import User

APP = "orm_async_tests.api.instrumented:make_app"
"""uvicorn's ``--factory`` target: the project's API plus the experiment's endpoints."""
BOUND = 10.0
"""Upper bound (s) of the waits that should end at once (a hang becomes a failed check)."""
WATCHED_HOLD = 60.0
"""pg_sleep of the watched request: far longer than the experiment waits for it (``BOUND``),
so that only the cancel on disconnect ends it in time."""


@dataclass(frozen=True)
class Sizes:
    requests: int = 50
    """HTTP requests per concurrency level (at least the highest level: one per worker)."""
    levels: str = "1,10,50"
    """Concurrency levels (client workers), comma-separated."""
    hold: float = 0.02
    """Seconds the slow endpoint of the load mix holds its connection in pg_sleep."""
    small_pool: int = 2
    """pool_size of the small server."""
    small_overflow: int = 0
    """max_overflow of the small server."""
    adequate_pool: int = 20
    """pool_size of the adequate server."""
    adequate_overflow: int = 10
    """max_overflow of the adequate server."""
    task_delay: float = 0.3
    """Seconds a background task waits before it writes (the response is sent meanwhile)."""
    abandoned_hold: float = 1.5
    """Seconds of pg_sleep the client that gives up asks for."""
    abandon_after: float = 0.3
    """Timeout (s) of the client that gives up; well below abandoned_hold."""

    def __post_init__(self) -> None:
        try:
            concurrencies = self.concurrencies
        except ValueError:
            raise BadSizes(f"levels ({self.levels!r}) must be integers, comma-separated") from None
        if not concurrencies or min(concurrencies) < 1:
            raise BadSizes(f"levels ({self.levels!r}) must be one or more integers >= 1")
        if self.requests < max(concurrencies):
            raise BadSizes(
                f"requests ({self.requests}) must be at least the highest level "
                f"({max(concurrencies)}): a worker without a request adds no concurrency"
            )
        small = self.small_pool + self.small_overflow
        if max(concurrencies) <= small:
            raise BadSizes(
                f"the highest level ({max(concurrencies)}) must be above small_pool + "
                f"small_overflow ({small}): else the small pool never fills, and the checks "
                "that it is used up to its limit and that requests queue cannot hold"
            )
        if self.abandon_after >= self.abandoned_hold / 2:
            raise BadSizes(
                f"abandon_after ({self.abandon_after}) must be well below abandoned_hold "
                f"({self.abandoned_hold}): under half of it"
            )

    @property
    def concurrencies(self) -> list[int]:
        return [int(c) for c in self.levels.split(",") if c.strip()]


run = experiment(14, "FastAPI under HTTP load: pools, background tasks, cancelled requests", Sizes)


# ============================================================================ the servers


@dataclass
class Served:
    """One uvicorn child process serving :data:`APP` with its own pool."""

    name: str
    app: str
    """Its connections' ``application_name``."""
    pool_size: int
    max_overflow: int
    child: server.ChildServer

    @property
    def limit(self) -> int:
        return self.pool_size + self.max_overflow

    def client(self, **options: Any) -> httpx.AsyncClient:
        return self.child.client(**options)

    async def connections(self, lab: Lab[Sizes], state: str | None = None) -> int:
        """Its server connections (in ``state``), as ``pg_stat_activity`` shows them."""
        return await probes.backends(lab.engine, self.app, state=state)

    async def connections_left(self, lab: Lab[Sizes]) -> int:
        """Its server connections once they are gone, or when :data:`BOUND` s are up."""
        return await probes.settle(lab.engine, self.app, 0, within=BOUND)


@dataclass
class Servers:
    small: Served
    adequate: Served
    user_id: int
    """A user with 50 track points (the load mix reads it)."""

    @property
    def both(self) -> tuple[Served, Served]:
        return (self.small, self.adequate)


async def start_server(
    lab: Lab[Sizes], name: str, pool_size: int, max_overflow: int, logs: Path
) -> Served:
    app = lab.name(name)
    port = free_port()
    child = await server.start(
        server.uvicorn_command(APP, port, graceful=int(BOUND)),
        port=port,
        env=lab.child_env(
            {
                "DB_POOL_SIZE": str(pool_size),
                "DB_MAX_OVERFLOW": str(max_overflow),
                "DB_POOL_TIMEOUT": str(BOUND * 3),
                "DB_APPLICATION_NAME": app,
            }
        ),
        log=logs / f"{name}.log",
        name=name,
    )
    return Served(name, app, pool_size, max_overflow, child)


@asynccontextmanager
async def api_servers(lab: Lab[Sizes]) -> AsyncIterator[Servers]:
    """The small-pool and the adequate-pool server, started side by side, and the user
    the load reads; whatever is still running at the end is stopped."""
    size = lab.sizes
    with tempfile.TemporaryDirectory(prefix="oat-e14-") as logs:
        started = await asyncio.gather(
            start_server(lab, "small", size.small_pool, size.small_overflow, Path(logs)),
            start_server(lab, "adequate", size.adequate_pool, size.adequate_overflow, Path(logs)),
            return_exceptions=True,
        )
        running = [s for s in started if isinstance(s, Served)]
        try:
            for failed in started:
                if isinstance(failed, BaseException):
                    raise failed
            small, adequate = running
            async with small.client() as client:
                user_id = await make_user(client, lab.name("load"), 50)
            yield Servers(small, adequate, user_id)
        finally:
            await asyncio.gather(*(s.child.stop() for s in running))


async def make_user(client: httpx.AsyncClient, username: str, points: int) -> int:
    created = await client.post("/users", json={"username": username})
    created.raise_for_status()
    user_id = int(created.json()["id"])
    start = datetime(2024, 1, 1, tzinfo=UTC)
    body = [
        {"lat": 48.85 + i / 1e4, "lon": 2.35, "date": (start + timedelta(seconds=i)).isoformat()}
        for i in range(points)
    ]
    (await client.post(f"/users/{user_id}/track-points", json=body)).raise_for_status()
    return user_id


async def server_state(client: httpx.AsyncClient) -> dict[str, Any]:
    """What the server's instrumented endpoints saw (``GET /e14/state``)."""
    found: dict[str, Any] = (await client.get("/e14/state")).json()
    return found


async def checked_out_at(client: httpx.AsyncClient) -> int:
    """Connections the server's pool has handed out right now."""
    return int((await server_state(client))["checked_out"])


async def client_event(client: httpx.AsyncClient, key: str) -> dict[str, Any]:
    """What the server recorded about the request or task ``key`` ({} if nothing yet)."""
    events: dict[str, dict[str, Any]] = (await server_state(client))["events"]
    return events.get(key, {})


# =================================================================================== load


@dataclass
class Level:
    concurrency: int
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    slow: int = 0
    queued: int = 0
    most_queued: int = 0
    waited: float = 0.0
    connects: int = 0

    @property
    def total(self) -> int:
        return len(self.latencies)

    @property
    def ok(self) -> int:
        return sum(n for status, n in self.statuses.items() if 200 <= status < 300)

    @property
    def other_statuses(self) -> dict[int, int]:
        return {s: n for s, n in sorted(self.statuses.items()) if not 200 <= s < 300}

    def quantile(self, q: int) -> float:
        """The q-th percentile of the latencies (inclusive method)."""
        if len(self.latencies) < 2:
            return self.latencies[0] if self.latencies else 0.0
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[q - 1]


@dataclass
class Config:
    served: Served
    levels: list[Level] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)
    """The server's connection counts, sampled while the levels ran (first and last
    sample included)."""


async def load_level(served: Served, paths: list[str], concurrency: int, requests: int) -> Level:
    """``requests`` requests over the path mix by ``concurrency`` workers (one client)."""
    level = Level(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with served.client(limits=limits) as client:
        (await client.post("/e14/reset")).raise_for_status()
        numbers = iter(range(requests))

        async def worker() -> None:
            for n in numbers:
                started = time.perf_counter()
                try:
                    response = await client.get(paths[n % len(paths)])
                except httpx.HTTPError as exc:
                    level.errors.append(describe(exc))
                else:
                    level.statuses[response.status_code] += 1
                level.latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        async with asyncio.timeout(requests * BOUND):
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        level.seconds = time.perf_counter() - started
        seen = await server_state(client)
    level.slow = int(seen["slow"])
    level.queued = int(seen["queued"])
    level.most_queued = int(seen["most_queued"])
    level.waited = float(seen["waited"])
    level.connects = int(seen["connects"])
    return level


async def load(
    lab: Lab[Sizes], served: Served, paths: list[str], concurrencies: list[int], requests: int
) -> Config:
    """Every level on ``served``, one after the other, its connections sampled meanwhile."""
    config = Config(served)
    async with probes.Sampler(
        lambda: served.connections(lab), every=0.02, within=requests * BOUND * len(concurrencies)
    ) as seen:
        for concurrency in concurrencies:
            config.levels.append(await load_level(served, paths, concurrency, requests))
    config.samples = seen.samples
    return config


@run.scenario
async def load_on_a_small_and_an_adequate_pool(lab: Lab[Sizes]) -> None:
    """The same mix (the slow endpoint, GET /users/{id}, a page of track points) at each
    concurrency level, on the small-pool server, then on the adequate-pool one, while
    pg_stat_activity is sampled; the server counts the requests that queued for a
    connection."""
    servers = await lab.use(api_servers)
    size = lab.sizes
    paths = [
        f"/e14/slow?hold={size.hold}",
        f"/users/{servers.user_id}",
        f"/e14/slow?hold={size.hold}",
        f"/users/{servers.user_id}/track-points?limit=20",
    ]
    slow_per_level = sum(
        paths[n % len(paths)].startswith("/e14/slow") for n in range(size.requests)
    )
    configs = [
        await load(lab, served, paths, size.concurrencies, size.requests) for served in servers.both
    ]
    small = configs[0]
    described = "; ".join(
        f"{c.served.name} (pool_size={c.served.pool_size}, max_overflow={c.served.max_overflow})"
        for c in configs
    )
    lab.check(
        "no errors under load",
        f"{size.requests} requests per concurrency level (half of them hold their connection "
        f"in pg_sleep({size.hold}), half read a user or a page of track points) all answer 2xx "
        "on both pools: a small pool makes requests wait for a connection, not fail "
        f"(pool_timeout is far above the waits). {described}.",
        expected={
            f"{c.served.name} c={lv.concurrency}": {
                "2xx": size.requests,
                "other statuses": {},
                "errors": [],
            }
            for c in configs
            for lv in c.levels
        },
        observed={
            f"{c.served.name} c={lv.concurrency}": {
                "2xx": lv.ok,
                "other statuses": lv.other_statuses,
                "errors": sorted(set(lv.errors)),
            }
            for c in configs
            for lv in c.levels
        },
    )
    lab.check(
        "server connections never exceed pool_size + max_overflow",
        "pg_stat_activity, sampled every 20 ms through lab.engine while the load runs, never "
        "shows more connections with the server's application_name than its pool allows; "
        "the small pool is used up to its limit.",
        expected={
            f"{c.served.name}: peak": small.served.limit
            if c is small
            else between(1, c.served.limit)
            for c in configs
        }
        | {f"{c.served.name}: samples (first and last included)": more_than(2) for c in configs},
        observed={f"{c.served.name}: peak": probes.peak(c.samples) for c in configs}
        | {f"{c.served.name}: samples (first and last included)": len(c.samples) for c in configs},
    )
    expected: dict[str, Any] = {}
    observed: dict[str, Any] = {}
    for c in configs:
        for lv in c.levels:
            where = f"{c.served.name} c={lv.concurrency}"
            if 2 * lv.concurrency <= c.served.limit:
                queued: Any = 0
            elif c is small and lv.concurrency > c.served.limit:
                queued = more_than(0)
            else:
                continue
            expected[where] = {"queued": queued, "slow requests": slow_per_level}
            observed[where] = {"queued": lv.queued, "slow requests": lv.slow}
    lab.check(
        "requests queue on the pool, not in errors",
        "The slow endpoint counts, in the server, the requests that found pool_size + "
        "max_overflow connections checked out when they asked for one (and so waited in "
        "the pool's queue): none where the clients cannot fill the pool (2 x concurrency "
        "<= pool_size + max_overflow: each client may still hold its previous request's "
        "connection, which is returned only after the response is sent), some on the small "
        "pool when the concurrency is above its limit.",
        expected=expected,
        observed=observed,
    )
    for c in configs:
        for lv in c.levels:
            where = f"{c.served.name} pool, c={lv.concurrency}"
            lab.figure(f"{where}: throughput", lv.total / lv.seconds, "req/s")
            lab.figure(f"{where}: p50", lv.quantile(50), "s")
            lab.figure(f"{where}: p95", lv.quantile(95), "s")
            lab.figure(
                f"{where}: slow requests that queued",
                lv.queued,
                f"of {lv.slow} (at most {lv.most_queued} at once)",
            )
            if lv.slow:
                lab.figure(f"{where}: mean checkout wait (server)", lv.waited / lv.slow, "s")
            lab.figure(f"{where}: connections the pool opened", lv.connects, "")


# ======================================================================= background tasks


VARIANTS = [
    # SessionDep; the task changes the request's User and commits the request's session
    "request-session",
    # the same task; Depends(scope='function'): the dependency exits before the response
    "function-session",
    # the task opens its own session from app.state.db.sessions and updates by id
    # (endpoint: scope='function')
    "own-session",
    # the same task; the endpoint's session in the default scope (SessionDep)
    "own-session-request-scope",
]
"""The /e14/bg/{path} endpoints: the first two run on the small server, the other two
on the adequate one (each server's connections are counted apart)."""


@dataclass
class Variant:
    path: str
    response: int = 0
    at_response: str = "?"
    """The task's outcome as the server had it when the response was in."""
    held_samples: list[int] = field(default_factory=list)
    """The server's connections idle in a transaction, sampled while the task waited."""
    event: dict[str, Any] = field(default_factory=dict)
    login_count: int = -1
    checked_out_after: int = -1

    @property
    def held(self) -> int:
        """The most connections of the server idle in a transaction while the task waited
        (-1: no sample was taken while it waited)."""
        return max(self.held_samples, default=-1)


async def run_variant(
    lab: Lab[Sizes], served: Served, client: httpx.AsyncClient, variant: Variant, delay: float
) -> None:
    created = await client.post("/users", json={"username": lab.name(f"bg-{variant.path}")})
    created.raise_for_status()
    user_id = int(created.json()["id"])
    key = f"bg-{variant.path}"
    response = await client.post(
        f"/e14/bg/{variant.path}/{user_id}", params={"key": key, "delay": delay}
    )
    variant.response = response.status_code
    event = await client_event(client, key)
    variant.at_response = str(event.get("outcome", "?"))
    deadline = time.perf_counter() + delay + BOUND
    while time.perf_counter() < deadline:
        held = await served.connections(lab, "idle in transaction")
        event = await client_event(client, key)
        if event.get("phase") not in ("queued", "waiting"):
            break
        variant.held_samples.append(held)  # taken while the task was still waiting
        await asyncio.sleep(0.02)
    while event.get("phase") != "done" and time.perf_counter() < deadline:
        await asyncio.sleep(0.02)
        event = await client_event(client, key)
    variant.event = event
    settled = await probes.poll(
        lambda: checked_out_at(client), lambda n: n == 0, within=BOUND, every=0.02
    )
    variant.checked_out_after = settled.value
    async with lab.sessions() as session:
        count = await session.scalar(select(User.login_count).where(User.id == user_id))
    variant.login_count = int(count if count is not None else -1)


def task_saw(v: Variant) -> dict[str, Any]:
    """What a task that used the request's session found, did, and left in the database."""
    return {
        "in transaction": v.event.get("in_transaction"),
        "user": v.event.get("user_state"),
        "outcome": v.event.get("outcome"),
        "login_count": v.login_count,
    }


@run.scenario
async def background_tasks_after_the_response(lab: Lab[Sizes]) -> None:
    """Four endpoints each queue a BackgroundTask that waits, then writes: with the
    request's session (default scope, then scope='function') on the small server, and
    meanwhile with a session of its own (from either scope) on the adequate one; each
    server runs one task at a time, and pg_stat_activity is sampled while it waits."""
    servers = await lab.use(api_servers)
    delay = lab.sizes.task_delay
    variants = {path: Variant(path) for path in VARIANTS}

    async def one_by_one(served: Served, paths: list[str]) -> None:
        async with served.client() as client:
            for path in paths:
                await run_variant(lab, served, client, variants[path], delay)

    await asyncio.gather(
        one_by_one(servers.small, VARIANTS[:2]), one_by_one(servers.adequate, VARIANTS[2:])
    )
    lab.check(
        "background tasks run after the response",
        f"Each endpoint answers 2xx while its task is still pending (it waits {delay} s "
        "before writing), and every task then runs to its end.",
        expected={
            path: {"response": between(200, 299), "task at the response": "pending", "then": "done"}
            for path in variants
        },
        observed={
            path: {
                "response": v.response,
                "task at the response": v.at_response,
                "then": v.event.get("phase"),
            }
            for path, v in variants.items()
        },
    )
    lab.check(
        "FastAPI >= 0.118: the request's session still works in a background task",
        "Contrary to the 0.106.0 release note ('using resources from dependencies with yield "
        "in background tasks is no longer supported'), and as since 0.118.0 (exit code after "
        "the response is sent): with the dependency in its default scope, the task finds the "
        "request's session still in its transaction and its User persistent; changing the "
        "User and committing that session works: login_count is 1.",
        expected={"in transaction": True, "user": "persistent", "outcome": "ok", "login_count": 1},
        observed=task_saw(variants["request-session"]),
    )
    lab.note(f"Served by FastAPI {version('fastapi')} and uvicorn {version('uvicorn')}.")
    lab.check(
        "Depends(scope='function'): the closed session loses the write silently",
        "With the dependency exited before the response (scope='function', what 0.106-0.117 "
        "did for every yield dependency), the task gets a closed session and a detached User: "
        "changing the User and committing raises nothing, but nothing is written "
        "(login_count stays 0).",
        expected={"in transaction": False, "user": "detached", "outcome": "ok", "login_count": 0},
        observed=task_saw(variants["function-session"]),
    )
    own = ("own-session", "own-session-request-scope")
    lab.check(
        "the right way: the task opens its own session",
        "A task that opens its own session from app.state.db.sessions and updates by id "
        "writes once, whatever the endpoint's dependency scope.",
        expected={path: {"outcome": "ok", "login_count": 1} for path in own},
        observed={
            path: {
                "outcome": variants[path].event.get("outcome"),
                "login_count": variants[path].login_count,
            }
            for path in own
        },
    )
    holds = {"request-session": 1, "function-session": 0, "own-session": 0}
    holds["own-session-request-scope"] = 1
    lab.check(
        "the request's connection is held until the background task ends",
        "With a default-scope session dependency, the request's connection stays checked "
        "out, idle in transaction on the server, after the response and while the task "
        "waits (the dependency's exit runs after the background tasks); with "
        "scope='function' it is back in the pool before the response. Every connection is "
        "back once the tasks are done.",
        expected={
            path: {"idle in transaction while the task waited": held, "checked out after": 0}
            for path, held in holds.items()
        },
        observed={
            path: {
                "idle in transaction while the task waited": v.held,
                "checked out after": v.checked_out_after,
            }
            for path, v in variants.items()
        },
    )
    for v in variants.values():
        lab.figure(f"background task ({v.path}): samples while it waited", len(v.held_samples), "")


# =========================================================================== cancellation


@dataclass
class Abandoned:
    client_error: str = "?"
    connections_before: int = -1
    sleeping_soon_after: int = -1
    """Backends of the server in pg_sleep a moment after the client left."""
    sleeping_at_the_end: int = -1
    """Backends of the server in pg_sleep when the wait for them to end was over."""
    ran_on: float = -1.0
    """Seconds from the client leaving until no backend of the server sleeps any more."""
    checked_out_during: int = -1
    other_request: int = 0
    event: dict[str, Any] = field(default_factory=dict)
    checked_out_after: int = -1
    connections_after: int = -1
    idle_after: int = -1
    next_request: int = 0


async def abandon(
    lab: Lab[Sizes],
    served: Served,
    endpoint: str,
    *,
    hold: float,
    after: float,
    wait: float,
    user_id: int,
) -> Abandoned:
    """Ask ``endpoint`` for a ``pg_sleep(hold)``, give up after ``after`` seconds, then wait
    up to ``wait`` seconds for the server's backends to leave pg_sleep."""
    found = Abandoned()
    found.connections_before = await served.connections(lab)
    key = f"abandoned{endpoint.replace('/', '-')}"
    async with served.client(timeout=httpx.Timeout(after)) as quitter:
        try:
            response = await quitter.get(endpoint, params={"hold": hold, "key": key})
            found.client_error = f"no error: {response.status_code}"
        except httpx.HTTPError as exc:
            found.client_error = describe(exc).removesuffix(": ")  # httpx's timeouts say nothing
    left = time.perf_counter()  # the client is closed: its TCP connection is gone
    async with served.client() as client:
        await asyncio.sleep(min(0.3, hold / 4))  # give the server a moment to react
        found.sleeping_soon_after = await probes.sleepers(lab.engine, served.app)
        if found.sleeping_soon_after:
            found.checked_out_during = await checked_out_at(client)
            found.other_request = (await client.get(f"/users/{user_id}")).status_code
        ended = await probes.poll(
            lambda: probes.sleepers(lab.engine, served.app),
            lambda n: n == 0,
            within=wait,
            every=0.02,
        )
        found.sleeping_at_the_end = ended.value
        found.ran_on = time.perf_counter() - left
        done = await probes.poll(
            lambda: client_event(client, key),
            lambda e: e.get("outcome") not in (None, "running"),
            within=BOUND,
        )
        found.event = done.value
        settled = await probes.poll(
            lambda: checked_out_at(client), lambda n: n == 0, within=BOUND, every=0.02
        )
        found.checked_out_after = settled.value
        found.connections_after = await served.connections(lab)
        found.idle_after = await served.connections(lab, "idle")
        found.next_request = (await client.get("/e14/slow", params={"hold": 0})).status_code
    return found


@run.scenario
async def client_gives_up_mid_query(lab: Lab[Sizes]) -> None:
    """A client with a short timeout asks for a long pg_sleep and leaves: on the small
    server the plain slow endpoint, at the same time on the adequate server an endpoint
    that watches for the disconnect and cancels its query."""
    servers = await lab.use(api_servers)
    size = lab.sizes
    hold, after = size.abandoned_hold, size.abandon_after
    small = servers.small
    plain_wait, watched_wait = hold + BOUND, BOUND
    plain, watched = await asyncio.gather(
        abandon(
            lab,
            small,
            "/e14/slow",
            hold=hold,
            after=after,
            wait=plain_wait,
            user_id=servers.user_id,
        ),
        abandon(
            lab,
            servers.adequate,
            "/e14/slow-watched",
            hold=WATCHED_HOLD,  # longer than the wait: only a cancel ends it in time
            after=after,
            wait=watched_wait,
            user_id=servers.user_id,
        ),
    )
    lab.check(
        "the client gives up",
        f"An httpx client with a {after} s timeout asking for a pg_sleep({hold}) gets a "
        "ReadTimeout, and is then closed (its TCP connection with it).",
        expected={"/e14/slow": prefix("ReadTimeout"), "/e14/slow-watched": prefix("ReadTimeout")},
        observed={"/e14/slow": plain.client_error, "/e14/slow-watched": watched.client_error},
    )
    lab.check(
        "uvicorn does not cancel an abandoned request: its query runs to the end",
        "After the client left, the request's backend is still in pg_sleep and the request "
        "still holds its pool connection (another request works meanwhile); the endpoint is "
        "not cancelled: its query completes, and only then does request.is_disconnected() "
        "say the client is gone. The query ends about the full hold after the client left.",
        expected={
            "in pg_sleep soon after the client left": 1,
            "pool connections checked out meanwhile": 1,
            "another request meanwhile": 200,
            "outcome": "completed",
            "is_disconnected() after the query": True,
        },
        observed={
            "in pg_sleep soon after the client left": plain.sleeping_soon_after,
            "pool connections checked out meanwhile": plain.checked_out_during,
            "another request meanwhile": plain.other_request,
            "outcome": plain.event.get("outcome"),
            "is_disconnected() after the query": plain.event.get("disconnected"),
        },
    )
    lab.check(
        "the abandoned request's connection comes back",
        "Once the query has ended, the pool counts 0 checked out, the server's connections "
        f"are all idle and within pool_size + max_overflow ({small.limit}), and a following "
        "request works.",
        expected={
            f"still in pg_sleep (waited up to {plain_wait:g} s)": 0,
            "checked out": 0,
            "connections": between(1, small.limit),
            "of which not idle": 0,
            "next request": 200,
        },
        observed={
            f"still in pg_sleep (waited up to {plain_wait:g} s)": plain.sleeping_at_the_end,
            "checked out": plain.checked_out_after,
            "connections": plain.connections_after,
            "of which not idle": plain.connections_after - plain.idle_after,
            "next request": plain.next_request,
        },
    )
    lab.check(
        "watching for the disconnect cancels the query",
        "An endpoint that polls request.is_disconnected() next to its query and cancels the "
        f"query when the client is gone stops its pg_sleep({WATCHED_HOLD:g}) on the server: "
        f"none is left after a wait far shorter than the hold. The pool slot comes back "
        "(0 checked out, a following request works) but the connection does not: SQLAlchemy "
        "invalidates a connection whose query was cancelled (experiment 10), so the server has "
        "one connection fewer.",
        expected={
            "outcome": "query cancelled on disconnect",
            f"still in pg_sleep (waited up to {watched_wait:g} s)": 0,
            "checked out": 0,
            "connections lost": 1,
            "next request": 200,
        },
        observed={
            "outcome": watched.event.get("outcome"),
            f"still in pg_sleep (waited up to {watched_wait:g} s)": watched.sleeping_at_the_end,
            "checked out": watched.checked_out_after,
            "connections lost": watched.connections_before - watched.connections_after,
            "next request": watched.next_request,
        },
    )
    lab.figure("abandoned /e14/slow: query ran on after the client left", plain.ran_on, "s")
    lab.figure(
        "watched /e14/slow-watched: pg_sleep gone after the client left", watched.ran_on, "s"
    )


# =============================================================================== shutdown


@run.scenario
async def graceful_shutdown(lab: Lab[Sizes]) -> None:
    """SIGTERM to both servers (at once), then pg_stat_activity for their connections."""
    servers = await lab.use(api_servers)
    before = {s.name: await s.connections(lab) for s in servers.both}
    stopping = time.perf_counter()
    codes = await asyncio.gather(*(s.child.stop(within=BOUND * 2) for s in servers.both))
    stopped_in = time.perf_counter() - stopping
    left = {s.name: await s.connections_left(lab) for s in servers.both}
    lab.check(
        "the servers stop on SIGTERM and take their connections with them",
        "On SIGTERM uvicorn shuts down gracefully (its log says 'Application shutdown "
        "complete.': the app's lifespan exit ran and disposed the engine), then raises the "
        "signal again, so the process ends killed by SIGTERM (-15), not with exit code 0; "
        "no connection with the server's application_name is left.",
        expected={
            f"{s.name}: {key}": value
            for s in servers.both
            for key, value in {
                "connections before SIGTERM": between(1, s.limit),
                "return code": -int(signal.SIGTERM),
                "shutdown in its log": contains("Application shutdown complete."),
                "connections left": 0,
            }.items()
        },
        observed={
            f"{s.name}: {key}": value
            for s, code in zip(servers.both, codes, strict=True)
            for key, value in {
                "connections before SIGTERM": before[s.name],
                "return code": code,
                "shutdown in its log": shutdown_lines(s.child.log_text()),
                "connections left": left[s.name],
            }.items()
        },
    )
    for s in servers.both:
        lab.figure(f"{s.name} server: start until /health answers", s.child.started_in, "s")
        errors = [
            line for line in s.child.log_text().splitlines() if "Error" in line or "ERROR" in line
        ]
        if errors:
            lab.note(f"{s.name} server log: " + " | ".join(errors[:5]))
    lab.figure("both servers: SIGTERM until they exited", stopped_in, "s")


def shutdown_lines(log: str) -> str:
    """The lines of a server log that speak of its shutdown (" | " between them)."""
    return " | ".join(line.strip() for line in log.splitlines() if "shutdown" in line.lower())
