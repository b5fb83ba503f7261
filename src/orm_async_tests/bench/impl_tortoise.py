"""Tortoise ORM, its idiomatic fastest pattern per operation.

One Tortoise context (``TortoiseContext``, Tortoise 1.x's isolated state) with
one asyncpg-backed connection of ``pool_size`` pooled connections, on the
models of :mod:`.tortoise_models` (the same tables; the schema comes from the
Alembic migrations, Tortoise never generates it). Tortoise has no session: each
query takes a connection from its pool and gives it back, so a task's handle is
nothing at all. Writes of one statement run in autocommit, ``bulk_create`` in a
transaction of its own. The patterns are the ones its documentation and
tortoise/orm-benchmarks use: ``create``, ``bulk_create``, ``get``,
``filter``, ``values_list``, ``filter().update()``, ``filter().delete()``,
``prefetch_related``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from tortoise.context import TortoiseContext

from .cases import Environment, Implementation
from .connect import server_params
from .dataset import Row
from .operations import SmallFilter, Update
from .tortoise_models import APP, Group, TrackPoint, User


class Tortoise(Implementation[None]):
    key = "tortoise"
    label = "Tortoise"

    def __init__(self) -> None:
        super().__init__()
        self.context: TortoiseContext | None = None

    async def open(self, env: Environment) -> None:
        params = server_params(env.db.target, env.db.settings, env.application_name)
        config = {
            "connections": {
                "default": {
                    "engine": "tortoise.backends.asyncpg",
                    "credentials": params.tortoise_credentials(env.pool_size),
                }
            },
            "apps": {APP: {"models": [f"{__package__}.tortoise_models"]}},
            "use_tz": True,
            "timezone": "UTC",
        }
        self.context = TortoiseContext()
        self.context.__enter__()  # current in this task and in the tasks it starts
        await self.context.init(config=config)

    @asynccontextmanager
    async def task(self) -> AsyncIterator[None]:
        yield None

    async def close(self) -> None:
        if self.context is not None:
            context, self.context = self.context, None
            await context.__aexit__(None, None, None)


IMPL = Tortoise()


@IMPL.case("insert_single")
async def insert_single(_: None, username: str) -> int:
    """``await User.create(username=...)``: one ``INSERT … RETURNING id``, defaults from Python."""
    user = await User.create(username=username)
    user_id: int = user.id
    return user_id


@IMPL.case("insert_batch")
async def insert_batch(_: None, rows: list[Row]) -> None:
    """``await TrackPoint.bulk_create([TrackPoint(**row) …])``: one ``executemany``, transaction."""
    await TrackPoint.bulk_create([TrackPoint(**row) for row in rows])


@IMPL.case("insert_bulk")
async def insert_bulk(_: None, rows: list[Row]) -> None:
    """``await TrackPoint.bulk_create(objects)``: every row in one ``executemany``.

    Tortoise builds a model instance per row, then sends one asyncpg
    ``executemany`` (``batch_size`` unset: all rows) inside a transaction.
    """
    await TrackPoint.bulk_create([TrackPoint(**row) for row in rows])


@IMPL.case("update_partial")
async def update_partial(_: None, item: Update) -> None:
    """``await User.filter(id=...).update(login_count=..., updated_at=now)``: one UPDATE.

    No instance fetched first; ``updated_at`` given explicitly, as Tortoise's
    ``auto_now`` is applied by ``save()`` only.
    """
    await User.filter(id=item.user_id).update(
        login_count=item.login_count, updated_at=datetime.now(UTC)
    )


@IMPL.case("delete")
async def delete(_: None, point_id: int) -> None:
    """``await TrackPoint.filter(id=...).delete()``: one DELETE, no instance fetched."""
    await TrackPoint.filter(id=point_id).delete()


@IMPL.case("get_by_pk")
async def get_by_pk(_: None, user_id: int) -> User:
    """``await User.get(id=...)``: one SELECT, one model instance."""
    return await User.get(id=user_id)


@IMPL.case("get_narrow")
async def get_narrow(_: None, group_id: int) -> Group:
    """``await Group.get(id=...)``: one SELECT, a two-column model instance."""
    return await Group.get(id=group_id)


@IMPL.case("filter_small")
async def filter_small(_: None, item: SmallFilter) -> list[TrackPoint]:
    """``await TrackPoint.filter(user_id=..., date__gte=...)``: model instances."""
    return await TrackPoint.filter(user_id=item.user_id, date__gte=item.since)


@IMPL.case("filter_large")
async def filter_large(_: None, user_id: int) -> list[TrackPoint]:
    """``await TrackPoint.filter(user_id=...)``: a model instance per row."""
    return await TrackPoint.filter(user_id=user_id)


@IMPL.case("filter_tuples")
async def filter_tuples(_: None, user_id: int) -> list[Any]:
    """``.values_list("id", "lat", "lon", "date")``: tuples, no model instances."""
    rows: list[Any] = await TrackPoint.filter(user_id=user_id).values_list(
        "id", "lat", "lon", "date"
    )
    return rows


@IMPL.case("relationship")
async def relationship(_: None, user_ids: list[int]) -> list[tuple[User, list[TrackPoint]]]:
    """``await User.filter(id__in=...).prefetch_related("track_points")``: two SELECTs."""
    users = await User.filter(id__in=user_ids).prefetch_related("track_points")
    return [(user, list(user.track_points)) for user in users]
