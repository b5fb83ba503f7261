"""The FastAPI application: users, their GPS track points, and stats.

- The lifespan builds the engine and session factory with the project's db
  module (``DATABASE_URL`` or the embedded PostgreSQL) and disposes them at
  shutdown. A database passed in by the caller (tests, experiment 14) is used
  as it is and left to its owner.
- ``SessionDep`` gives each request its own ``AsyncSession``: writes commit in
  the endpoint (so a constraint violation still becomes a response), anything
  not committed is rolled back, and the session is always closed.
- Errors: see :mod:`.errors` (409 unique violations, 422 bad values, 503 when
  the database is down, never a traceback in a response).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, FastAPI, HTTPException, Path, Query, Request
from sqlalchemy import func, insert, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from .. import migrations
from ..db import Database, open_database
from ..errors import explain, sqlstate
from ..models import TrackPoint, User
from ..settings import Settings
from . import errors
from .schemas import (
    MAX_POINTS_PER_REQUEST,
    Health,
    Inserted,
    Problem,
    Stats,
    TrackPointIn,
    TrackPointOut,
    TrackPointPage,
    UserIn,
    UserOut,
)

log = logging.getLogger("orm_async_tests.api")


async def session_dependency(request: Request) -> AsyncIterator[AsyncSession]:
    """One AsyncSession per request; closed (and so rolled back if not committed) after it."""
    db: Database = request.app.state.db
    async with db.sessions() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(session_dependency)]
UserId = Annotated[int, Path(ge=1, le=2**63 - 1)]
"""A user id in a path: a positive bigint (a larger one is a 422, not a database error)."""
PROBLEMS: dict[int | str, dict[str, Any]] = {
    404: {"model": Problem},
    409: {"model": Problem},
    503: {"model": Problem, "description": "The database is unavailable"},
}

router = APIRouter()


@router.post("/users", status_code=201, response_model=UserOut, responses=PROBLEMS)
async def create_user(body: UserIn, session: SessionDep) -> User:
    user = User(username=body.username, profile=body.profile, tags=body.tags)
    session.add(user)
    try:
        await session.commit()
    except IntegrityError as exc:
        await session.rollback()
        if sqlstate(exc) == "23505":
            raise HTTPException(409, f"username {body.username!r} is already taken") from None
        raise
    return user


@router.get("/users", response_model=list[UserOut], responses=PROBLEMS)
async def list_users(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> list[User]:
    rows = await session.scalars(select(User).order_by(User.id).limit(limit).offset(offset))
    return list(rows)


@router.get("/users/{user_id}", response_model=UserOut, responses=PROBLEMS)
async def get_user(user_id: UserId, session: SessionDep) -> User:
    return await existing_user(session, user_id)


@router.post(
    "/users/{user_id}/track-points", status_code=201, response_model=Inserted, responses=PROBLEMS
)
async def add_track_points(
    user_id: UserId,
    points: Annotated[list[TrackPointIn], Body(max_length=MAX_POINTS_PER_REQUEST)],
    session: SessionDep,
) -> Inserted:
    """Insert up to 10,000 points in one statement (ORM bulk insert, executemany)."""
    await existing_user(session, user_id)
    if points:
        await session.execute(
            insert(TrackPoint), [{"user_id": user_id, **p.model_dump()} for p in points]
        )
    await session.commit()
    return Inserted(inserted=len(points))


@router.get("/users/{user_id}/track-points", response_model=TrackPointPage, responses=PROBLEMS)
async def list_track_points(
    user_id: UserId,
    session: SessionDep,
    after: Annotated[int, Query(ge=0, le=2**63 - 1, description="last id seen")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> TrackPointPage:
    """A page of the user's points in id order (keyset pagination: pass `next_after`)."""
    await existing_user(session, user_id)
    rows = list(
        await session.scalars(
            select(TrackPoint)
            .where(TrackPoint.user_id == user_id, TrackPoint.id > after)
            .order_by(TrackPoint.id)
            .limit(limit + 1)
        )
    )
    more = len(rows) > limit
    items = rows[:limit]
    return TrackPointPage(
        items=[TrackPointOut.model_validate(p) for p in items],
        next_after=items[-1].id if more else None,
    )


@router.get("/stats", response_model=Stats, responses=PROBLEMS)
async def stats(session: SessionDep) -> Stats:
    """Counts and the time span of all track points, in one aggregate query."""
    users = select(func.count()).select_from(User).scalar_subquery()
    row = (
        await session.execute(
            select(
                users,
                func.count(TrackPoint.id),
                func.min(TrackPoint.date),
                func.max(TrackPoint.date),
            )
        )
    ).one()
    user_count, point_count, first, last = row
    return Stats(
        users=user_count,
        track_points=point_count,
        points_per_user=point_count / user_count if user_count else 0.0,
        first_point=first,
        last_point=last,
    )


@router.get("/health", response_model=Health, responses=PROBLEMS)
async def health(session: SessionDep) -> Health:
    version = await session.scalar(text("SHOW server_version"))
    return Health(database="ok", server_version=str(version))


async def existing_user(session: AsyncSession, user_id: int) -> User:
    user = await session.get(User, user_id)
    if user is None:
        raise HTTPException(404, f"no user {user_id}")
    return user


def create_app(settings: Settings | None = None, *, database: Database | None = None) -> FastAPI:
    """The application. With ``database``, use it (and leave disposing it to the caller)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = database or open_database(settings or Settings.from_env())
        app.state.db = db
        app.state.target = db.target
        try:
            message = await migrations.prepare(db)
            if message:
                log.info(message)
        except Exception as exc:
            # serve anyway: every request answers 503 with the reason until it is fixed
            log.error("database not ready: %s", explain(exc, db.target) or exc)
        try:
            yield
        finally:
            if database is None:
                await db.dispose()

    app = FastAPI(
        title="orm-async-tests API",
        summary="Users and their GPS track points, on async SQLAlchemy + PostgreSQL.",
        version="1.0.0",
        lifespan=lifespan,
    )
    if database is not None:  # usable without the lifespan too (ASGI test clients)
        app.state.db = database
        app.state.target = database.target
    app.include_router(router)
    errors.install(app)
    return app
