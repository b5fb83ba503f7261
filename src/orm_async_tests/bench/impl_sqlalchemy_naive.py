"""SQLAlchemy's async ORM as the tutorials write it: the naive column.

The project's ``async_sessionmaker`` (``expire_on_commit=False``) on its own
engine, sized for the run, without pre-ping (SQLAlchemy's default; neither the
asyncpg pool nor Tortoise pings either). Each task holds one ``AsyncSession``
for its ops; a write op ends with ``commit()``, which also hands the connection
back to the pool until the next op checks one out. Nothing here is wrong — every
result is right — it is simply the code one writes first: ORM objects,
``add``/``add_all`` + ``commit``, ``session.get``, ``select(Entity)``,
``selectinload`` (the loader the asyncio docs recommend).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload

from ..db import Database
from ..models import Group, TrackPoint, User
from .cases import Environment, Implementation
from .dataset import Row
from .operations import SmallFilter, Update


class SqlalchemyNaive(Implementation[AsyncSession]):
    key = "sqlalchemy_naive"
    label = "SA naive"

    def __init__(self) -> None:
        super().__init__()
        self.db: Database | None = None

    async def open(self, env: Environment) -> None:
        self.db = env.open_database(self.driver)

    @asynccontextmanager
    async def task(self) -> AsyncIterator[AsyncSession]:
        assert self.db is not None
        async with self.db.sessions() as session:
            yield session

    async def close(self) -> None:
        if self.db is not None:
            await self.db.dispose()
            self.db = None


IMPL = SqlalchemyNaive()


@IMPL.case("insert_single")
async def insert_single(session: AsyncSession, username: str) -> int:
    """``session.add(User(...))`` + ``commit()``: the unit of work.

    BEGIN, ``INSERT … RETURNING`` every server default (``eager_defaults="auto"``),
    COMMIT; the connection goes back to the pool at commit.
    """
    user = User(username=username)
    session.add(user)
    await session.commit()
    return user.id


@IMPL.case("insert_batch")
async def insert_batch(session: AsyncSession, rows: list[Row]) -> None:
    """``session.add_all([TrackPoint(**row) …])`` + ``commit()``.

    One ORM object per row, then a flush that sends insertmanyvalues pages of
    ``INSERT … VALUES (…), (…) RETURNING id`` to give every object its key.
    """
    session.add_all([TrackPoint(**row) for row in rows])
    await session.commit()


@IMPL.case("insert_bulk")
async def insert_bulk(session: AsyncSession, rows: list[Row]) -> None:
    """``session.add_all([TrackPoint(**row) …])`` + ``commit()``, for every row."""
    session.add_all([TrackPoint(**row) for row in rows])
    await session.commit()


@IMPL.case("update_partial")
async def update_partial(session: AsyncSession, item: Update) -> None:
    """``user = await session.get(User, id)``, set the attribute, ``commit()``.

    A SELECT of the whole row, then an ``UPDATE … SET login_count, updated_at``
    (the model's ``onupdate``) at flush.
    """
    user = await session.get(User, item.user_id)
    assert user is not None
    user.login_count = item.login_count
    await session.commit()


@IMPL.case("delete")
async def delete(session: AsyncSession, point_id: int) -> None:
    """``await session.delete(await session.get(TrackPoint, id))`` + ``commit()``."""
    point = await session.get(TrackPoint, point_id)
    await session.delete(point)
    await session.commit()


@IMPL.case("get_by_pk")
async def get_by_pk(session: AsyncSession, user_id: int) -> User | None:
    """``await session.get(User, id)``: a ``User`` from the identity map or a SELECT.

    The identity map only answers for an object the session still holds; a read
    of a key it does not hold is a full ORM query.
    """
    return await session.get(User, user_id)


@IMPL.case("get_narrow")
async def get_narrow(session: AsyncSession, group_id: int) -> Group | None:
    """``await session.get(Group, id)``: a two-column ``Group`` (its members not loaded)."""
    return await session.get(Group, group_id)


@IMPL.case("filter_small")
async def filter_small(session: AsyncSession, item: SmallFilter) -> Sequence[TrackPoint]:
    """``(await session.scalars(select(TrackPoint).where(...))).all()``: ORM objects."""
    stmt = select(TrackPoint).where(
        TrackPoint.user_id == item.user_id, TrackPoint.date >= item.since
    )
    return (await session.scalars(stmt)).all()


@IMPL.case("filter_large")
async def filter_large(session: AsyncSession, user_id: int) -> Sequence[TrackPoint]:
    """``(await session.scalars(select(TrackPoint).where(...))).all()``: an object per row."""
    return (await session.scalars(select(TrackPoint).where(TrackPoint.user_id == user_id))).all()


@IMPL.case("filter_tuples")
async def filter_tuples(session: AsyncSession, user_id: int) -> Sequence[Any]:
    """``(await session.execute(select(TrackPoint.id, ...))).all()``: rows of four columns.

    Column expressions instead of the entity: no objects, but still the ORM's
    statement compilation and result layer on every call.
    """
    stmt = select(TrackPoint.id, TrackPoint.lat, TrackPoint.lon, TrackPoint.date).where(
        TrackPoint.user_id == user_id
    )
    return (await session.execute(stmt)).all()


@IMPL.case("relationship")
async def relationship(session: AsyncSession, user_ids: list[int]) -> list[tuple[User, Any]]:
    """``select(User).where(User.id.in_(ids)).options(selectinload(User.track_points))``.

    Two statements (parents, then children ``WHERE user_id IN (…)``): the eager
    loader the asyncio docs recommend, since a lazy load cannot run under asyncio.
    """
    stmt = select(User).where(User.id.in_(user_ids)).options(selectinload(User.track_points))
    users = (await session.scalars(stmt)).all()
    return [(user, user.track_points) for user in users]
