"""The fastest correct SQLAlchemy *ORM* patterns: ORM objects out, the ORM's API in.

The column to hold against the other ORMs (Tortoise, Piccolo), which return model
instances: every read here returns mapped objects (``User``, ``Group``,
``TrackPoint``, users with their ``track_points`` collection loaded), every write
goes through the ``AsyncSession``. What makes it fast, beside the naive column:

1. **ORM statements built once, at import** (``select(User).where(User.id ==
   bindparam(...))``): compiled once per engine, prepared once per connection; an
   op binds values, where building the statement per call walks its cache key.
2. **An AUTOCOMMIT session per task** (``async_sessionmaker`` bound to an engine
   made with ``isolation_level="AUTOCOMMIT"``, as SA best Core's): one statement per
   op is its own transaction, no ``BEGIN``/``COMMIT`` round trips; the session keeps
   its connection for all of the task's ops (it is never committed, so never hands
   the connection back to the pool between ops). Every write op is one statement,
   so it is atomic anyway; a session on this engine must not be used for a unit of
   work of several statements.
3. **ORM-enabled INSERT/UPDATE/DELETE statements** (``session.execute(insert(User)
   …)``, ``update(User)``, ``delete(TrackPoint)`` with ``synchronize_session=False``):
   no object loaded first and no flush: the unit of work's bookkeeping is for
   objects that change, these ops change rows.

The same code runs on psycopg (``IMPL.twin("psycopg")``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import bindparam, delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import selectinload

from ..db import Database
from ..models import Group, TrackPoint, User
from .cases import Environment, Implementation
from .dataset import Row
from .operations import SmallFilter, Update


class SqlalchemyOrm(Implementation[AsyncSession]):
    key = "sqlalchemy_orm"
    label = "SA best ORM"

    def __init__(self) -> None:
        super().__init__()
        self.db: Database | None = None
        self.sessions: async_sessionmaker[AsyncSession] | None = None

    async def open(self, env: Environment) -> None:
        self.db = env.open_database(self.driver, pool_use_lifo=True, isolation_level="AUTOCOMMIT")
        self.sessions = async_sessionmaker(self.db.engine, expire_on_commit=False)

    @asynccontextmanager
    async def task(self) -> AsyncIterator[AsyncSession]:
        assert self.sessions is not None
        async with self.sessions() as session:
            yield session

    async def close(self) -> None:
        if self.db is not None:
            await self.db.dispose()
            self.db = self.sessions = None


IMPL = SqlalchemyOrm()
NO_SYNC = {"synchronize_session": False}
"""ORM UPDATE/DELETE: no objects of the session to bring up to date (it holds none)."""

GET_USER = select(User).where(User.id == bindparam("b_id"))


@IMPL.case("get_by_pk")
async def get_by_pk(session: AsyncSession, user_id: int) -> User:
    """``session.scalars(select(User).where(User.id == :id))``, built once: one ``User``.

    ``session.get`` looks in the identity map first and builds its query per call:
    for a key the session does not hold (the timed ops keep no object, so it never
    does) it is that query plus the lookup, and ran slower.
    """
    return (await session.scalars(GET_USER, {"b_id": user_id})).one()


GET_GROUP = select(Group).where(Group.id == bindparam("b_id"))


@IMPL.case("get_narrow")
async def get_narrow(session: AsyncSession, group_id: int) -> Group:
    """``session.scalars(select(Group).where(Group.id == :id))``, built once: one ``Group``."""
    return (await session.scalars(GET_GROUP, {"b_id": group_id})).one()


SMALL_FILTER = select(TrackPoint).where(
    TrackPoint.user_id == bindparam("b_user_id"), TrackPoint.date >= bindparam("b_since")
)


@IMPL.case("filter_small")
async def filter_small(session: AsyncSession, item: SmallFilter) -> Sequence[TrackPoint]:
    """``session.scalars(select(TrackPoint).where(...))``, built once: ``TrackPoint`` objects."""
    found = await session.scalars(SMALL_FILTER, {"b_user_id": item.user_id, "b_since": item.since})
    return found.all()


POINTS_OF_USER = select(TrackPoint).where(TrackPoint.user_id == bindparam("b_user_id"))


@IMPL.case("filter_large")
async def filter_large(session: AsyncSession, user_id: int) -> Sequence[TrackPoint]:
    """``session.scalars(select(TrackPoint))``, built once: an object per row.

    Most of the time goes into making the instances and their state, as in every
    ORM; SA best Core's ``Row`` skips that.
    """
    return (await session.scalars(POINTS_OF_USER, {"b_user_id": user_id})).all()


TUPLES_OF_USER = select(TrackPoint.id, TrackPoint.lat, TrackPoint.lon, TrackPoint.date).where(
    TrackPoint.user_id == bindparam("b_user_id")
)


@IMPL.case("filter_tuples")
async def filter_tuples(session: AsyncSession, user_id: int) -> Sequence[Any]:
    """``session.execute(select(TrackPoint.id, …))``, built once: ``Row`` tuples.

    ORM column expressions, no instances: what Tortoise's ``values_list`` and
    Piccolo's ``select(...)`` give.
    """
    return (await session.execute(TUPLES_OF_USER, {"b_user_id": user_id})).all()


USERS_WITH_POINTS = (
    select(User)
    .where(User.id.in_(bindparam("b_ids", expanding=True)))
    .options(selectinload(User.track_points))
)


@IMPL.case("relationship")
async def relationship(session: AsyncSession, user_ids: list[int]) -> list[tuple[User, Any]]:
    """``select(User).where(User.id.in_(ids)).options(selectinload(User.track_points))``,
    built once: users with their collection loaded.

    Two statements (users, then their points ``WHERE user_id IN (…)``), the
    loader the asyncio docs recommend (a lazy load cannot run under asyncio).
    """
    users = (await session.scalars(USERS_WITH_POINTS, {"b_ids": user_ids})).all()
    return [(user, user.track_points) for user in users]


INSERT_USER = insert(User).returning(User.id)


@IMPL.case("insert_single")
async def insert_single(session: AsyncSession, username: str) -> int:
    """``session.scalar(insert(User).returning(User.id), {...})``: an ORM-enabled INSERT.

    One ``INSERT … RETURNING id`` on the AUTOCOMMIT session, where ``add()`` +
    ``flush()`` also makes the object, its state and the flush plan, and fetches
    every server default back (``eager_defaults``).
    """
    user_id = await session.scalar(INSERT_USER, {"username": username})
    assert user_id is not None
    return user_id


INSERT_POINTS = insert(TrackPoint)


@IMPL.case("insert_batch")
async def insert_batch(session: AsyncSession, rows: list[Row]) -> None:
    """``session.execute(insert(TrackPoint), rows)``: the ORM's bulk INSERT of dicts.

    One ``executemany`` (no RETURNING asked: no objects to give keys to), which both
    drivers pipeline and run as one implicit transaction: all rows or none, also on
    the AUTOCOMMIT session (seen here with a duplicate key in the middle of a batch).
    SA best Core's ``unnest`` INSERT is one statement instead; through the session it
    runs only as ``dml_strategy="raw"``, i.e. as Core, since the ORM reads the
    parameters as the rows to insert.
    """
    await session.execute(INSERT_POINTS, rows)


@IMPL.case("insert_bulk")
async def insert_bulk(session: AsyncSession, rows: list[Row]) -> None:
    """The ORM's bulk INSERT (``session.execute(insert(TrackPoint), rows)``) of every row."""
    await session.execute(INSERT_POINTS, rows)


UPDATE_LOGIN_COUNT = (
    update(User)
    .where(User.id == bindparam("b_id"))
    .values(login_count=bindparam("b_login_count"))
    .execution_options(**NO_SYNC)
)


@IMPL.case("update_partial")
async def update_partial(session: AsyncSession, item: Update) -> None:
    """``session.execute(update(User).where(User.id == :id).values(...))``: no SELECT first.

    An ORM-enabled UPDATE; ``updated_at`` still moves (the column's ``onupdate``).
    """
    await session.execute(
        UPDATE_LOGIN_COUNT, {"b_id": item.user_id, "b_login_count": item.login_count}
    )


DELETE_POINT = (
    delete(TrackPoint).where(TrackPoint.id == bindparam("b_id")).execution_options(**NO_SYNC)
)


@IMPL.case("delete")
async def delete_point(session: AsyncSession, point_id: int) -> None:
    """``session.execute(delete(TrackPoint).where(TrackPoint.id == :id))``: no object loaded."""
    await session.execute(DELETE_POINT, {"b_id": point_id})
