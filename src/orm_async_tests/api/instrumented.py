"""The project's API plus the instrumented endpoints experiment 14 drives.

Experiment 14 (:mod:`orm_async_tests.test14_http_load`) serves :func:`make_app`
with a real uvicorn in a child process (``uvicorn --factory
orm_async_tests.api.instrumented:make_app``) and drives it over HTTP. Everything
here runs in that server process:

- ``GET /e14/slow`` holds its connection in ``pg_sleep`` and counts, in the
  server, the requests that found ``pool_size + max_overflow`` connections
  checked out when they asked for one (and so queued in the pool);
- ``GET /e14/slow-watched`` cancels its query when the client disconnects;
- ``POST /e14/bg/...`` queue a BackgroundTask that writes after the response,
  with the request's session (default scope or ``scope="function"``) or with a
  session of its own;
- ``GET /e14/state`` reports what the server saw (its pool, its counters, what
  each keyed request or task found and did); ``POST /e14/reset`` zeroes the
  counters.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Depends, FastAPI, Query, Request
from sqlalchemy import event, inspect, text, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ..db import Database
from ..lab import probes
from ..lab.outcomes import describe
from ..models import User
from .app import SessionDep, create_app, existing_user, session_dependency

BOUND = 10.0
"""Upper bound (s) of the waits inside the server that should end at once."""

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
    found: dict[str, Any] = {"outcome": "running"}
    if key is not None:
        STATE.events[key] = found
    await check_out(request, session)
    STATE.slow += 1
    try:
        await session.execute(text("SELECT pg_sleep(:hold)"), {"hold": hold})
    except BaseException as exc:  # CancelledError included: record, then let it go on
        found["outcome"] = describe(exc)
        raise
    found["outcome"] = "completed"
    found["disconnected"] = await request.is_disconnected()
    return {"slept": hold}


@lab_router.get("/slow-watched")
async def slow_watched(
    request: Request,
    session: SessionDep,
    key: str,
    hold: Annotated[float, Query(ge=0, le=60)] = 1.0,
) -> dict[str, Any]:
    """Like /slow, but a watcher polls ``request.is_disconnected()`` and cancels the query."""
    found: dict[str, Any] = {"outcome": "running"}
    STATE.events[key] = found
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
            found["cancelled_at"] = time.time()
        await asyncio.wait({query, watcher}, timeout=BOUND)
    if query.cancelled():
        found["outcome"] = "query cancelled on disconnect"
    elif query.exception() is not None:
        found["outcome"] = describe(query.exception() or Exception())
    else:
        found["outcome"] = "completed"
    return {"outcome": found["outcome"]}


def queue_event(key: str) -> None:
    """Called by the endpoint: the task is queued, the response not sent yet."""
    STATE.events[key] = {"phase": "queued", "outcome": "pending"}


def begin_event(key: str, session: AsyncSession | None, user: User | None) -> dict[str, Any]:
    """Called first thing in the task: what it finds."""
    found = STATE.events.setdefault(key, {"outcome": "pending"})
    found["phase"] = "waiting"
    if session is not None:
        found["in_transaction"] = session.in_transaction()
    if user is not None:
        found["user_state"] = "detached" if inspect(user).detached else "persistent"
    return found


async def bump_with_request_session(
    session: AsyncSession, user: User, key: str, delay: float
) -> None:
    """The pitfall: after the response, change the request's object and commit its session."""
    found = begin_event(key, session, user)
    await asyncio.sleep(delay)
    found["phase"] = "writing"
    try:
        user.login_count += 1
        await session.commit()
    except Exception as exc:
        found["outcome"] = describe(exc)
    else:
        found["outcome"] = "ok"
    found["phase"] = "done"
    found["done_at"] = time.time()


async def bump_in_own_session(
    sessions: async_sessionmaker[AsyncSession], user_id: int, key: str, delay: float
) -> None:
    """The right way: the task opens (and closes) its own session and updates by id."""
    found = begin_event(key, None, None)
    await asyncio.sleep(delay)
    found["phase"] = "writing"
    try:
        async with sessions.begin() as own:
            await own.execute(
                update(User).where(User.id == user_id).values(login_count=User.login_count + 1)
            )
    except Exception as exc:
        found["outcome"] = describe(exc)
    else:
        found["outcome"] = "ok"
    found["phase"] = "done"
    found["done_at"] = time.time()


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
    """The project's app plus the experiment's router (uvicorn's ``--factory`` target)."""
    app = create_app()
    app.include_router(lab_router)
    return app
