"""Experiment 14: FastAPI under HTTP load: pools, background tasks, cancelled requests.

The project's API (:mod:`orm_async_tests.api`) runs under a real uvicorn in a
child process on loopback (a free port), so server and clients do not share an
event loop; concurrent ``httpx.AsyncClient`` workers drive it. Each server
gets its pool size from the environment (``DB_POOL_SIZE``,
``DB_MAX_OVERFLOW``) and its own ``DB_APPLICATION_NAME``, so
``pg_stat_activity`` (sampled through ``lab.engine``) shows exactly that
server's connections. The experiment adds a router of its own to the app
(:func:`make_app`): a slow endpoint that holds its connection in ``pg_sleep``
and counts the requests that found the pool full, the BackgroundTasks
variants, and a state endpoint that reports what the server saw.

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

What FastAPI 0.165 does (observed here, and in its ``routing.request_response``):
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
import contextlib
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, BackgroundTasks, Depends, FastAPI, Query, Request
from sqlalchemy import event, inspect, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from . import probes
from .api.app import SessionDep, create_app, existing_user, session_dependency
from .db import Database
from .harness import Lab, child_env, describe, experiment, free_port
from .models import User

BOUND = 10.0
"""Upper bound (s) of the waits that should end at once (a hang becomes a failed check)."""
START_BOUND = 60.0
"""How long a server may take to answer /health after it was started."""


# ====================================================== server side (runs in uvicorn's process)

FunctionSessionDep = Annotated[AsyncSession, Depends(session_dependency, scope="function")]
"""The app's session dependency, exited before the response is sent (FastAPI >= 0.121)."""


@dataclass
class ServerState:
    """What the experiment's endpoints saw, kept in the server process."""

    slow: int = 0
    queued: int = 0
    """Slow requests that found ``pool_size + max_overflow`` connections checked out."""
    queued_now: int = 0
    most_queued: int = 0
    """The most slow requests waiting for a connection at the same moment."""
    waited: float = 0.0
    """Seconds the slow requests spent in checkout, in total."""
    connects: int = 0
    """New DBAPI connections the pool opened (its ``connect`` event)."""
    counting: bool = False
    events: dict[str, dict[str, Any]] = field(default_factory=dict)


STATE = ServerState()
lab_router = APIRouter(prefix="/e14")


def database(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


def pool_limit(db: Database) -> int:
    return db.settings.pool_size + db.settings.max_overflow


async def check_out(request: Request, session: AsyncSession) -> None:
    """Get the session its connection, counting the requests that had to queue for it."""
    db = database(request)
    full = probes.checked_out(db.engine) >= pool_limit(db)
    started = time.perf_counter()
    if full:
        STATE.queued += 1
        STATE.queued_now += 1
        STATE.most_queued = max(STATE.most_queued, STATE.queued_now)
    try:
        await session.connection()
    finally:
        if full:
            STATE.queued_now -= 1
        STATE.waited += time.perf_counter() - started


@lab_router.get("/slow")
async def slow(
    request: Request,
    session: SessionDep,
    hold: Annotated[float, Query(ge=0, le=60)] = 0.02,
    key: str | None = None,
) -> dict[str, Any]:
    """Hold a connection in ``pg_sleep(hold)``; with ``key``, record how the request ended."""
    event: dict[str, Any] = {"outcome": "running"}
    if key is not None:
        STATE.events[key] = event
    await check_out(request, session)
    STATE.slow += 1
    try:
        await session.execute(text("SELECT pg_sleep(:hold)"), {"hold": hold})
    except BaseException as exc:  # CancelledError included: record, then let it go on
        event["outcome"] = describe(exc)
        raise
    event["outcome"] = "completed"
    event["disconnected"] = await request.is_disconnected()
    return {"slept": hold}


@lab_router.get("/slow-watched")
async def slow_watched(
    request: Request,
    session: SessionDep,
    key: str,
    hold: Annotated[float, Query(ge=0, le=60)] = 1.0,
) -> dict[str, Any]:
    """Like /slow, but a watcher polls ``request.is_disconnected()`` and cancels the query."""
    event: dict[str, Any] = {"outcome": "running"}
    STATE.events[key] = event
    await session.connection()
    query = asyncio.create_task(session.execute(text("SELECT pg_sleep(:hold)"), {"hold": hold}))

    async def client_gone() -> None:
        while not await request.is_disconnected():  # noqa: ASYNC110 (polling is the point)
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(client_gone())
    try:
        await asyncio.wait({query, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not query.done():
            query.cancel()
            event["cancelled_at"] = time.time()
        await asyncio.wait({query, watcher}, timeout=BOUND)
    if query.cancelled():
        event["outcome"] = "query cancelled on disconnect"
    elif query.exception() is not None:
        event["outcome"] = describe(query.exception() or Exception())
    else:
        event["outcome"] = "completed"
    return {"outcome": event["outcome"]}


def queue_event(key: str) -> None:
    """Called by the endpoint: the task is queued, the response not sent yet."""
    STATE.events[key] = {"phase": "queued", "outcome": "pending"}


def begin_event(key: str, session: AsyncSession | None, user: User | None) -> dict[str, Any]:
    """Called first thing in the task: what it finds."""
    event = STATE.events.setdefault(key, {"outcome": "pending"})
    event["phase"] = "waiting"
    if session is not None:
        event["in_transaction"] = session.in_transaction()
    if user is not None:
        event["user_state"] = "detached" if inspect(user).detached else "persistent"
    return event


async def bump_with_request_session(
    session: AsyncSession, user: User, key: str, delay: float
) -> None:
    """The pitfall: after the response, change the request's object and commit its session."""
    event = begin_event(key, session, user)
    await asyncio.sleep(delay)
    event["phase"] = "writing"
    try:
        user.login_count += 1
        await session.commit()
    except Exception as exc:
        event["outcome"] = describe(exc)
    else:
        event["outcome"] = "ok"
    event["phase"] = "done"
    event["done_at"] = time.time()


async def bump_in_own_session(
    sessions: async_sessionmaker[AsyncSession], user_id: int, key: str, delay: float
) -> None:
    """The right way: the task opens (and closes) its own session and updates by id."""
    event = begin_event(key, None, None)
    await asyncio.sleep(delay)
    event["phase"] = "writing"
    try:
        async with sessions.begin() as own:
            await own.execute(
                update(User).where(User.id == user_id).values(login_count=User.login_count + 1)
            )
    except Exception as exc:
        event["outcome"] = describe(exc)
    else:
        event["outcome"] = "ok"
    event["phase"] = "done"
    event["done_at"] = time.time()


@lab_router.post("/bg/request-session/{user_id}")
async def bg_request_session(
    user_id: int, key: str, delay: float, session: SessionDep, background: BackgroundTasks
) -> dict[str, Any]:
    user = await existing_user(session, user_id)
    queue_event(key)
    background.add_task(bump_with_request_session, session, user, key, delay)
    return {"login_count": user.login_count}


@lab_router.post("/bg/function-session/{user_id}")
async def bg_function_session(
    user_id: int, key: str, delay: float, session: FunctionSessionDep, background: BackgroundTasks
) -> dict[str, Any]:
    user = await existing_user(session, user_id)
    queue_event(key)
    background.add_task(bump_with_request_session, session, user, key, delay)
    return {"login_count": user.login_count}


@lab_router.post("/bg/own-session/{user_id}")
async def bg_own_session(
    request: Request,
    user_id: int,
    key: str,
    delay: float,
    session: FunctionSessionDep,
    background: BackgroundTasks,
) -> dict[str, Any]:
    user = await existing_user(session, user_id)
    queue_event(key)
    background.add_task(bump_in_own_session, database(request).sessions, user_id, key, delay)
    return {"login_count": user.login_count}


@lab_router.post("/bg/own-session-request-scope/{user_id}")
async def bg_own_session_request_scope(
    request: Request,
    user_id: int,
    key: str,
    delay: float,
    session: SessionDep,
    background: BackgroundTasks,
) -> dict[str, Any]:
    user = await existing_user(session, user_id)
    queue_event(key)
    background.add_task(bump_in_own_session, database(request).sessions, user_id, key, delay)
    return {"login_count": user.login_count}


@lab_router.get("/state")
async def state(request: Request) -> dict[str, Any]:
    db = database(request)
    return {
        "checked_out": probes.checked_out(db.engine),
        "limit": pool_limit(db),
        "slow": STATE.slow,
        "queued": STATE.queued,
        "most_queued": STATE.most_queued,
        "waited": STATE.waited,
        "connects": STATE.connects,
        "events": STATE.events,
    }


@lab_router.post("/reset")
async def reset(request: Request) -> dict[str, Any]:
    """Zero the counters (and start counting the pool's new connections)."""
    if not STATE.counting:
        event.listen(database(request).engine.sync_engine, "connect", count_connect)
        STATE.counting = True
    STATE.slow = STATE.queued = STATE.most_queued = STATE.connects = 0
    STATE.waited = 0.0
    return {}


def count_connect(dbapi_connection: Any, record: Any) -> None:
    STATE.connects += 1


def make_app() -> FastAPI:
    """The project's app plus this experiment's router (uvicorn ``--factory`` target)."""
    app = create_app()
    app.include_router(lab_router)
    return app


# ======================================================================= client side


@dataclass
class Server:
    """One uvicorn child process serving :func:`make_app` with its own pool."""

    name: str
    app: str
    """Its connections' ``application_name``."""
    pool_size: int
    max_overflow: int
    port: int
    proc: asyncio.subprocess.Process
    log: Path
    started_in: float = 0.0
    returncode: int | None = None
    left_connections: int = -1

    @property
    def limit(self) -> int:
        return self.pool_size + self.max_overflow

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **options: Any) -> httpx.AsyncClient:
        options.setdefault("timeout", httpx.Timeout(BOUND * 3))
        return httpx.AsyncClient(base_url=self.url, **options)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def shut_down(self) -> bool:
        """Whether uvicorn logged the end of the lifespan (the engine disposed)."""
        return "Application shutdown complete." in self.log_text()


def server_env(lab: Lab, app: str, pool_size: int, max_overflow: int) -> dict[str, str]:
    return child_env(
        lab,
        {
            "DB_POOL_SIZE": str(pool_size),
            "DB_MAX_OVERFLOW": str(max_overflow),
            "DB_POOL_TIMEOUT": str(BOUND * 3),
            "DB_APPLICATION_NAME": app,
        },
    )


async def start_server(
    lab: Lab, name: str, pool_size: int, max_overflow: int, logs: Path
) -> Server:
    app = f"{lab.tag}{name}"
    port = free_port()
    log = logs / f"{name}.log"
    args = [
        sys.executable,
        "-m",
        "uvicorn",
        f"{__name__}:make_app",
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-access-log",
        "--log-level",
        "info",
        "--timeout-graceful-shutdown",
        str(int(BOUND)),
    ]
    started = time.perf_counter()
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *args,
            env=server_env(lab, app, pool_size, max_overflow),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )
    server = Server(name, app, pool_size, max_overflow, port, proc, log)
    try:
        await wait_ready(server)
    except BaseException:
        await stop_server(lab, server)
        raise
    server.started_in = time.perf_counter() - started
    return server


async def wait_ready(server: Server) -> None:
    """Poll /health until it answers 200 (bounded); fail early if the process exits."""
    deadline = time.perf_counter() + START_BOUND
    async with server.client(timeout=httpx.Timeout(2.0)) as client:
        while True:
            if server.proc.returncode is not None:
                tail = server.log_text().strip().splitlines()[-5:]
                raise RuntimeError(
                    f"the {server.name} server exited with {server.proc.returncode}: "
                    + " | ".join(tail)
                )
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get("/health")).status_code == 200:
                    return
            if time.perf_counter() > deadline:
                raise TimeoutError(f"the {server.name} server did not answer in {START_BOUND} s")
            await asyncio.sleep(0.1)


async def stop_server(lab: Lab, server: Server) -> None:
    """SIGTERM (uvicorn's graceful shutdown runs the lifespan: the engine is disposed);
    SIGKILL if it is still there after a bound. Records the exit code."""
    proc = server.proc
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(BOUND * 2):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
    server.returncode = proc.returncode
    found = await probes.poll(
        lambda: probes.backends(lab.engine, server.app), lambda n: n == 0, within=BOUND
    )
    server.left_connections = found.value


# ------------------------------------------------------------------------------- load


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

    def quantile(self, q: int) -> float:
        """The q-th percentile of the latencies (inclusive method)."""
        if len(self.latencies) < 2:
            return self.latencies[0] if self.latencies else 0.0
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[q - 1]

    def shown(self) -> str:
        others = {s: n for s, n in self.statuses.items() if not 200 <= s < 300}
        bad = f", other statuses {dict(others)}" if others else ""
        errors = f", errors {sorted(set(self.errors))}" if self.errors else ""
        return f"c={self.concurrency}: {self.ok}/{self.total} 2xx{bad}{errors}"


@dataclass
class Config:
    server: Server
    levels: list[Level] = field(default_factory=list)
    peak: int = 0


async def load_level(server: Server, paths: list[str], concurrency: int, requests: int) -> Level:
    """``requests`` requests over the path mix by ``concurrency`` workers (one client)."""
    level = Level(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with server.client(limits=limits) as client:
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
        seen = (await client.get("/e14/state")).json()
    level.slow = int(seen["slow"])
    level.queued = int(seen["queued"])
    level.most_queued = int(seen["most_queued"])
    level.waited = float(seen["waited"])
    level.connects = int(seen["connects"])
    return level


async def load(
    lab: Lab, server: Server, paths: list[str], concurrencies: list[int], requests: int
) -> Config:
    config = Config(server)
    peak = probes.Peak(
        lambda: probes.backends(lab.engine, server.app),
        within=requests * BOUND * len(concurrencies),
        every=0.02,
    )
    try:
        for concurrency in concurrencies:
            config.levels.append(await load_level(server, paths, concurrency, requests))
    finally:
        config.peak = await peak.stop()
    return config


# --------------------------------------------------------------------- background tasks


@dataclass
class Variant:
    path: str
    response: int = 0
    pending_at_response: bool = False
    held_samples: list[int] = field(default_factory=list)
    event: dict[str, Any] = field(default_factory=dict)
    login_count: int = -1
    checked_out_after: int = -1

    @property
    def held(self) -> int:
        """The most connections of the server idle in a transaction while the task waited."""
        return max(self.held_samples, default=-1)


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
"""The /e14/bg/{path} endpoints, in the order report_background expects them."""


async def run_variant(
    lab: Lab, server: Server, client: httpx.AsyncClient, variant: Variant, delay: float
) -> None:
    created = await client.post("/users", json={"username": f"{lab.tag}bg-{variant.path}"})
    created.raise_for_status()
    user_id = int(created.json()["id"])
    key = f"bg-{variant.path}"
    response = await client.post(
        f"/e14/bg/{variant.path}/{user_id}", params={"key": key, "delay": delay}
    )
    variant.response = response.status_code
    event = await client_event(client, key)
    variant.pending_at_response = event.get("outcome") == "pending"
    deadline = time.perf_counter() + delay + BOUND
    while time.perf_counter() < deadline:
        held = await probes.backends(lab.engine, server.app, state="idle in transaction")
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


async def checked_out_at(client: httpx.AsyncClient) -> int:
    return int((await client.get("/e14/state")).json()["checked_out"])


async def background_tasks(lab: Lab, server: Server, delay: float) -> dict[str, Variant]:
    found: dict[str, Variant] = {}
    async with server.client() as client:
        for path in VARIANTS:
            variant = Variant(path)
            await run_variant(lab, server, client, variant, delay)
            found[path] = variant
    return found


# ------------------------------------------------------------------------- cancellation


@dataclass
class Abandoned:
    client_error: str = "?"
    connections_before: int = -1
    sleeping_soon_after: int = -1
    """Backends of the server in pg_sleep a moment after the client left."""
    ran_on: float = -1.0
    """Seconds from the client leaving until no backend of the server sleeps any more."""
    stopped: bool = False
    checked_out_during: int = -1
    other_request: int = 0
    event: dict[str, Any] = field(default_factory=dict)
    checked_out_after: int = -1
    connections_after: int = -1
    idle_after: int = -1
    next_request: int = 0


async def abandon(
    lab: Lab, server: Server, endpoint: str, *, hold: float, after: float, user_id: int
) -> Abandoned:
    """Ask ``endpoint`` for a ``pg_sleep(hold)`` and give up after ``after`` seconds."""
    found = Abandoned()
    found.connections_before = await probes.backends(lab.engine, server.app)
    key = f"abandoned{endpoint.replace('/', '-')}"
    async with server.client(timeout=httpx.Timeout(after)) as quitter:
        try:
            response = await quitter.get(endpoint, params={"hold": hold, "key": key})
            found.client_error = f"no error: {response.status_code}"
        except httpx.HTTPError as exc:
            found.client_error = describe(exc).removesuffix(": ")  # httpx's timeouts say nothing
    left = time.perf_counter()  # the client is closed: its TCP connection is gone
    async with server.client() as client:
        await asyncio.sleep(min(0.3, hold / 4))  # give the server a moment to react
        found.sleeping_soon_after = await probes.sleepers(lab.engine, server.app)
        if found.sleeping_soon_after:
            found.checked_out_during = await checked_out_at(client)
            found.other_request = (await client.get(f"/users/{user_id}")).status_code
        ended = await probes.poll(
            lambda: probes.sleepers(lab.engine, server.app),
            lambda n: n == 0,
            within=hold + BOUND,
            every=0.02,
        )
        found.stopped = ended.held
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
        found.connections_after = await probes.backends(lab.engine, server.app)
        found.idle_after = await probes.backends(lab.engine, server.app, state="idle")
        found.next_request = (await client.get("/e14/slow", params={"hold": 0})).status_code
    return found


async def client_event(client: httpx.AsyncClient, key: str) -> dict[str, Any]:
    events: dict[str, dict[str, Any]] = (await client.get("/e14/state")).json()["events"]
    return events.get(key, {})


async def cancellations(
    lab: Lab, server: Server, *, hold: float, after: float, user_id: int
) -> tuple[Abandoned, Abandoned]:
    plain = await abandon(lab, server, "/e14/slow", hold=hold, after=after, user_id=user_id)
    watched = await abandon(
        lab, server, "/e14/slow-watched", hold=hold, after=after, user_id=user_id
    )
    return plain, watched


# ================================================================================ the run


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


@experiment(14, "FastAPI under HTTP load: pools, background tasks, cancelled requests")
async def run(
    lab: Lab,
    *,
    requests: int = 200,
    levels: str = "1,10,50",
    hold: float = 0.02,
    small_pool: int = 2,
    small_overflow: int = 0,
    adequate_pool: int = 20,
    adequate_overflow: int = 10,
    task_delay: float = 0.5,
    abandoned_hold: float = 3.0,
    abandon_after: float = 0.3,
) -> None:
    """Served by uvicorn and driven by concurrent HTTP clients, how do throughput and
    p50/p95 latency change with concurrency on a small pool and an adequate one, do the
    server's connections stay within pool_size + max_overflow, what happens to a request's
    session used in a BackgroundTask after the response (FastAPI >= 0.106), and does a
    request the client abandons mid-query stop its query and return its connection?"""
    concurrencies = [int(c) for c in levels.split(",") if c.strip()]
    if abandon_after >= abandoned_hold / 2:
        raise ValueError("abandon_after must be well below abandoned_hold")
    with tempfile.TemporaryDirectory(prefix="oat-e14-") as logs:
        servers: list[Server] = []
        try:
            starting = [
                start_server(lab, "small", small_pool, small_overflow, Path(logs)),
                start_server(lab, "adequate", adequate_pool, adequate_overflow, Path(logs)),
            ]
            started = await asyncio.gather(*starting, return_exceptions=True)
            servers = [s for s in started if isinstance(s, Server)]
            for failed in started:
                if isinstance(failed, BaseException):
                    raise failed
            small, adequate = servers
            await observe(
                lab,
                small,
                adequate,
                concurrencies=concurrencies,
                requests=requests,
                hold=hold,
                task_delay=task_delay,
                abandoned_hold=abandoned_hold,
                abandon_after=abandon_after,
            )
        finally:
            for server in servers:
                await stop_server(lab, server)
        report_shutdown(lab, servers)  # reads the logs: inside the temporary directory


async def observe(
    lab: Lab,
    small: Server,
    adequate: Server,
    *,
    concurrencies: list[int],
    requests: int,
    hold: float,
    task_delay: float,
    abandoned_hold: float,
    abandon_after: float,
) -> None:
    async with small.client() as client:
        user_id = await make_user(client, f"{lab.tag}load", 50)
    paths = [
        f"/e14/slow?hold={hold}",
        f"/users/{user_id}",
        f"/e14/slow?hold={hold}",
        f"/users/{user_id}/track-points?limit=20",
    ]
    configs = [
        await load(lab, server, paths, concurrencies, requests) for server in (small, adequate)
    ]
    report_load(lab, configs, requests, hold)

    variants, (plain, watched) = await asyncio.gather(
        background_tasks(lab, adequate, task_delay),
        cancellations(lab, small, hold=abandoned_hold, after=abandon_after, user_id=user_id),
    )
    report_background(lab, variants, task_delay)
    report_cancellation(lab, small, plain, watched, abandoned_hold, abandon_after)
    for server in (small, adequate):
        lab.figure(f"{server.name} server: start until /health answers", server.started_in, "s")


# ============================================================================= reporting


def report_load(lab: Lab, configs: list[Config], requests: int, hold: float) -> None:
    described = "; ".join(
        f"{c.server.name} (pool_size={c.server.pool_size}, max_overflow={c.server.max_overflow})"
        for c in configs
    )
    lab.check(
        "no errors under load",
        f"{requests} requests per concurrency level (half of them hold their connection in "
        f"pg_sleep({hold}), half read a user or a page of track points) all answer 2xx on "
        f"both pools: a small pool makes requests wait for a connection, not fail "
        f"(pool_timeout is far above the waits). {described}.",
        expected=" | ".join(
            f"{c.server.name}: "
            + ", ".join(f"c={lv.concurrency}: {requests}/{requests} 2xx" for lv in c.levels)
            for c in configs
        ),
        observed=" | ".join(
            f"{c.server.name}: " + ", ".join(lv.shown() for lv in c.levels) for c in configs
        ),
        passed=all(
            lv.ok == lv.total == requests and not lv.errors for c in configs for lv in c.levels
        ),
    )
    lab.check(
        "server connections never exceed pool_size + max_overflow",
        "pg_stat_activity, sampled every 20 ms through lab.engine while the load runs, never "
        "shows more connections with the server's application_name than its pool allows; "
        "the small pool is used up to its limit.",
        expected=" | ".join(
            f"{c.server.name}: peak {'=' if i == 0 else '<='} {c.server.limit}"
            for i, c in enumerate(configs)
        ),
        observed=" | ".join(f"{c.server.name}: peak {c.peak}" for c in configs),
        passed=configs[0].peak == configs[0].server.limit
        and all(0 < c.peak <= c.server.limit for c in configs),
    )
    expected: list[str] = []
    observed: list[str] = []
    holds = True
    for c in configs:
        for lv in c.levels:
            where = f"{c.server.name} c={lv.concurrency}"
            if 2 * lv.concurrency <= c.server.limit:
                expected.append(f"{where}: 0")
                holds &= lv.queued == 0
            elif c is configs[0] and lv.concurrency > c.server.limit:
                expected.append(f"{where}: > 0")
                holds &= lv.queued > 0
            else:
                continue
            observed.append(f"{where}: {lv.queued} of {lv.slow}")
    lab.check(
        "requests queue on the pool, not in errors",
        "The slow endpoint counts, in the server, the requests that found pool_size + "
        "max_overflow connections checked out when they asked for one (and so waited in "
        "the pool's queue): none where the clients cannot fill the pool (2 x concurrency "
        "<= pool_size + max_overflow: each client may still hold its previous request's "
        "connection, which is returned only after the response is sent), some on the small "
        "pool when the concurrency is above its limit.",
        expected="; ".join(expected),
        observed="; ".join(observed),
        passed=holds,
    )
    for c in configs:
        for lv in c.levels:
            where = f"{c.server.name} pool, c={lv.concurrency}"
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


def task_saw(v: Variant) -> str:
    """What a task that used the request's session found, did, and left in the database."""
    transaction = "in transaction" if v.event.get("in_transaction") else "no transaction"
    return (
        f"{transaction}, user {v.event.get('user_state', '?')}, "
        f"outcome {v.event.get('outcome', '?')}, login_count {v.login_count}"
    )


def report_background(lab: Lab, variants: dict[str, Variant], delay: float) -> None:
    reused = variants["request-session"]
    closed = variants["function-session"]
    own = variants["own-session"]
    own_request = variants["own-session-request-scope"]
    every = list(variants.values())
    lab.check(
        "background tasks run after the response",
        f"Each endpoint answers 2xx while its task is still pending (it waits {delay} s "
        "before writing), and every task then runs to its end.",
        expected="all: 2xx, pending at the response, done afterwards",
        observed="; ".join(
            f"{v.path}: {v.response}, "
            f"{'pending' if v.pending_at_response else 'not pending'} at the response, "
            f"{v.event.get('phase', '?')} afterwards"
            for v in every
        ),
        passed=all(
            200 <= v.response < 300 and v.pending_at_response and v.event.get("phase") == "done"
            for v in every
        ),
    )
    lab.check(
        "FastAPI 0.165: the request's session still works in a background task",
        "Contrary to the 0.106.0 release note ('using resources from dependencies with yield "
        "in background tasks is no longer supported'), and as since 0.118.0 (exit code after "
        "the response is sent): with the dependency in its default scope, the task finds the "
        "request's session still in its transaction and its User persistent; changing the "
        "User and committing that session works: login_count is 1.",
        expected="in transaction, user persistent, outcome ok, login_count 1",
        observed=task_saw(reused),
        passed=reused.event.get("in_transaction") is True
        and reused.event.get("user_state") == "persistent"
        and reused.event.get("outcome") == "ok"
        and reused.login_count == 1,
    )
    lab.check(
        "Depends(scope='function'): the closed session loses the write silently",
        "With the dependency exited before the response (scope='function', what 0.106-0.117 "
        "did for every yield dependency), the task gets a closed session and a detached User: "
        "changing the User and committing raises nothing, but nothing is written "
        "(login_count stays 0).",
        expected="no transaction, user detached, outcome ok, login_count 0",
        observed=task_saw(closed),
        passed=closed.event.get("in_transaction") is False
        and closed.event.get("user_state") == "detached"
        and closed.event.get("outcome") == "ok"
        and closed.login_count == 0,
    )
    lab.check(
        "the right way: the task opens its own session",
        "A task that opens its own session from app.state.db.sessions and updates by id "
        "writes once, whatever the endpoint's dependency scope.",
        expected="both: outcome ok, login_count 1",
        observed=f"{own.path}: {own.event.get('outcome', '?')}, login_count {own.login_count}; "
        f"{own_request.path}: {own_request.event.get('outcome', '?')}, login_count "
        f"{own_request.login_count}",
        passed=all(
            v.event.get("outcome") == "ok" and v.login_count == 1 for v in (own, own_request)
        ),
    )
    lab.check(
        "the request's connection is held until the background task ends",
        "With a default-scope session dependency, the request's connection stays checked "
        "out, idle in transaction on the server, after the response and while the task "
        "waits (the dependency's exit runs after the background tasks); with "
        "scope='function' it is back in the pool before the response. Every connection is "
        "back once the tasks are done.",
        expected="request-session: 1, function-session: 0, own-session: 0, "
        "own-session-request-scope: 1 idle in transaction; 0 checked out after",
        observed=", ".join(f"{v.path}: {v.held}" for v in every)
        + " idle in transaction; "
        + ", ".join(str(v.checked_out_after) for v in every)
        + " checked out after",
        passed=[v.held for v in every] == [1, 0, 0, 1]
        and all(v.checked_out_after == 0 for v in every),
    )
    for v in every:
        lab.figure(f"background task ({v.path}): samples while it waited", len(v.held_samples), "")


def report_cancellation(
    lab: Lab,
    server: Server,
    plain: Abandoned,
    watched: Abandoned,
    hold: float,
    after: float,
) -> None:
    lab.check(
        "the client gives up",
        f"An httpx client with a {after} s timeout asking for a pg_sleep({hold}) gets a "
        "ReadTimeout, and is then closed (its TCP connection with it).",
        expected="ReadTimeout, for both endpoints",
        observed=f"/e14/slow: {plain.client_error}; /e14/slow-watched: {watched.client_error}",
        passed=all(a.client_error.startswith("ReadTimeout") for a in (plain, watched)),
    )
    lab.check(
        "uvicorn does not cancel an abandoned request: its query runs to the end",
        "After the client left, the request's backend is still in pg_sleep and the request "
        "still holds its pool connection (another request works meanwhile); the endpoint is "
        "not cancelled: its query completes, and only then does request.is_disconnected() "
        "say the client is gone. The query ends about the full hold after the client left.",
        expected="1 in pg_sleep, 1 checked out, other request 200; outcome completed, "
        "disconnected True",
        observed=f"{plain.sleeping_soon_after} in pg_sleep, {plain.checked_out_during} checked "
        f"out, other request {plain.other_request}; outcome {plain.event.get('outcome', '?')}, "
        f"disconnected {plain.event.get('disconnected', '?')}",
        passed=plain.sleeping_soon_after == 1
        and plain.checked_out_during == 1
        and plain.other_request == 200
        and plain.event.get("outcome") == "completed"
        and plain.event.get("disconnected") is True,
    )
    lab.check(
        "the abandoned request's connection comes back",
        "Once the query has ended, the pool counts 0 checked out, the server's connections "
        f"are all idle and within pool_size + max_overflow ({server.limit}), and a following "
        "request works.",
        expected=f"0 checked out, n idle of n <= {server.limit}, next request 200",
        observed=f"{plain.checked_out_after} checked out, {plain.idle_after} idle of "
        f"{plain.connections_after}, next request {plain.next_request}",
        passed=plain.stopped
        and plain.checked_out_after == 0
        and plain.idle_after == plain.connections_after <= server.limit
        and plain.next_request == 200,
    )
    lab.check(
        "watching for the disconnect cancels the query",
        "An endpoint that polls request.is_disconnected() next to its query and cancels the "
        "query when the client is gone stops the pg_sleep on the server long before its "
        "hold. The pool slot comes back (0 checked out, a following request works) but the "
        "connection does not: SQLAlchemy invalidates a connection whose query was cancelled "
        "(experiment 10), so the server has one connection fewer.",
        expected=f"outcome 'query cancelled on disconnect', pg_sleep gone before {hold} s, "
        "0 checked out, connections n -> n-1, next request 200",
        observed=f"outcome {watched.event.get('outcome', '?')!r}, pg_sleep gone after "
        f"{watched.ran_on:.2f} s, {watched.checked_out_after} checked out, connections "
        f"{watched.connections_before} -> {watched.connections_after}, next request "
        f"{watched.next_request}",
        passed=watched.event.get("outcome") == "query cancelled on disconnect"
        and watched.stopped
        and watched.ran_on < hold
        and watched.checked_out_after == 0
        and watched.connections_after == watched.connections_before - 1
        and watched.next_request == 200,
    )
    lab.figure("abandoned /e14/slow: query ran on after the client left", plain.ran_on, "s")
    lab.figure(
        "watched /e14/slow-watched: pg_sleep gone after the client left", watched.ran_on, "s"
    )


def report_shutdown(lab: Lab, servers: list[Server]) -> None:
    lab.check(
        "the servers stop on SIGTERM and take their connections with them",
        "On SIGTERM uvicorn shuts down gracefully (its log says 'Application shutdown "
        "complete.': the app's lifespan exit ran and disposed the engine), then raises the "
        "signal again, so the process ends killed by SIGTERM (-15), not with exit code 0; "
        "no connection with the server's application_name is left.",
        expected=", ".join(f"{s.name}: -15, shutdown complete, 0 connections" for s in servers),
        observed=", ".join(
            f"{s.name}: {s.returncode}, "
            f"{'shutdown complete' if s.shut_down() else 'no shutdown in the log'}, "
            f"{s.left_connections} connections"
            for s in servers
        ),
        passed=all(
            s.returncode == -signal.SIGTERM and s.shut_down() and s.left_connections == 0
            for s in servers
        ),
    )
    for s in servers:
        errors = [line for line in s.log_text().splitlines() if "Error" in line or "ERROR" in line]
        if errors:
            lab.note(f"{s.name} server log: " + " | ".join(errors[:5]))
