"""Piccolo ORM, its idiomatic fastest pattern per operation.

One ``PostgresEngine`` (:data:`.piccolo_tables.ENGINE`) with an asyncpg pool of
``pool_size`` connections, started at :meth:`Piccolo.open` from the same
connection parameters as the asyncpg column, on the tables of
:mod:`.piccolo_tables` (the same tables; the schema comes from the Alembic
migrations, Piccolo never creates it). Like Tortoise, Piccolo has no session:
outside ``engine.transaction()`` each query takes a connection from the pool
and gives it back, so a task's handle is nothing at all, and every query runs in
autocommit. Piccolo builds its SQL text anew for each query and hands it to
asyncpg, whose statement cache prepares each distinct text once per
connection.

The patterns are the ones Piccolo's documentation and tortoise/orm-benchmarks'
Piccolo case use: ``Table(...).save()``, ``Table.insert(*rows)``,
``objects().get()``, ``objects().where()``, ``select()`` for plain values,
``update({...}).where()``, ``delete().where()``; JSONB is decoded by
``.output(load_json=True)``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from .cases import Environment, Implementation
from .connect import server_params
from .dataset import Row
from .operations import SmallFilter, Update
from .piccolo_tables import ENGINE, Group, TrackPoint, User

MAX_ARGUMENTS = 32767
"""Bind parameters asyncpg (and PostgreSQL's protocol) allows in one statement."""
ROWS_PER_INSERT = MAX_ARGUMENTS // (len(TrackPoint._meta.columns) - 1)
"""Track points per ``insert()``: Piccolo sends every column but the primary key
(``DEFAULT``) as a parameter, and splits nothing itself."""


class Piccolo(Implementation[None]):
    key = "piccolo"
    label = "Piccolo"

    async def open(self, env: Environment) -> None:
        params = server_params(env.db.target, env.db.settings, env.application_name)
        await ENGINE.start(params.asyncpg_kwargs(), env.pool_size)

    @asynccontextmanager
    async def task(self) -> AsyncIterator[None]:
        yield None

    async def close(self) -> None:
        await ENGINE.stop()


IMPL = Piccolo()


@IMPL.case("insert_single")
async def insert_single(_: None, username: str) -> int:
    """``await User(username=...).save()``: one ``INSERT … RETURNING id``, defaults from Python.

    ``save()`` of a new row is ``User.insert(row).returning(User.id)``; the id is
    set on the object.
    """
    user = User(username=username)
    await user.save()
    user_id: int = user.id
    return user_id


def _points(rows: list[Row]) -> list[TrackPoint]:
    return [TrackPoint(**row) for row in rows]


@IMPL.case("insert_batch")
async def insert_batch(_: None, rows: list[Row]) -> None:
    """``await TrackPoint.insert(*[TrackPoint(**row) …])``: one multi-row ``INSERT … VALUES``.

    A table instance per row, then one statement with a ``(…)`` group of
    parameters per row (its text the same for every batch of 100): one
    statement, so atomic.
    """
    await TrackPoint.insert(*_points(rows))


@IMPL.case("insert_bulk")
async def insert_bulk(_: None, rows: list[Row]) -> None:
    """``TrackPoint.insert(*objects)`` in ``engine.transaction()``, 6,553 rows per statement.

    The same multi-row INSERT as the batch; Piccolo does not split it, and one
    statement takes at most 32,767 parameters (5 per row here), so 10,000 rows
    go as two statements in one transaction: atomic.
    """
    points = _points(rows)
    async with ENGINE.transaction():
        for start in range(0, len(points), ROWS_PER_INSERT):
            await TrackPoint.insert(*points[start : start + ROWS_PER_INSERT])


@IMPL.case("update_partial")
async def update_partial(_: None, item: Update) -> None:
    """``await User.update({User.login_count: ...}).where(User.id == ...)``: one UPDATE.

    No instance fetched first; ``updated_at``'s ``auto_update`` adds
    ``updated_at = <now>`` to the statement.
    """
    await User.update({User.login_count: item.login_count}).where(User.id == item.user_id)


@IMPL.case("delete")
async def delete(_: None, point_id: int) -> None:
    """``await TrackPoint.delete().where(TrackPoint.id == ...)``: one DELETE, no instance."""
    await TrackPoint.delete().where(TrackPoint.id == point_id)


@IMPL.case("get_by_pk")
async def get_by_pk(_: None, user_id: int) -> User | None:
    """``await User.objects().output(load_json=True).get(User.id == ...)``: one table instance.

    ``load_json=True`` turns the JSONB text of ``profile`` into a dict (Piccolo
    returns the text otherwise).
    """
    return await User.objects().output(load_json=True).get(User.id == user_id)


@IMPL.case("get_narrow")
async def get_narrow(_: None, group_id: int) -> Group | None:
    """``await Group.objects().get(Group.id == ...)``: a two-column table instance."""
    return await Group.objects().get(Group.id == group_id)


@IMPL.case("filter_small")
async def filter_small(_: None, item: SmallFilter) -> list[TrackPoint]:
    """``await TrackPoint.objects().where(user_id == ..., date >= ...)``: table instances."""
    return await TrackPoint.objects().where(
        TrackPoint.user_id == item.user_id, TrackPoint.date >= item.since
    )


@IMPL.case("filter_large")
async def filter_large(_: None, user_id: int) -> list[TrackPoint]:
    """``await TrackPoint.objects().where(TrackPoint.user_id == ...)``: an instance per row.

    Piccolo turns asyncpg's records into dicts, then each dict into a table
    instance.
    """
    return await TrackPoint.objects().where(TrackPoint.user_id == user_id)


@IMPL.case("filter_tuples")
async def filter_tuples(_: None, user_id: int) -> list[tuple[Any, ...]]:
    """``TrackPoint.select(id, lat, lon, date)`` → ``tuple(row.values())``: no instances.

    Piccolo's ``select`` returns a dict per row and has no tuple output
    (``as_list`` is for one column); the tuples are made from the dicts, as in
    tortoise/orm-benchmarks' Piccolo case.
    """
    rows = await TrackPoint.select(
        TrackPoint.id, TrackPoint.lat, TrackPoint.lon, TrackPoint.date
    ).where(TrackPoint.user_id == user_id)
    return [tuple(row.values()) for row in rows]


@IMPL.case("relationship")
async def relationship(_: None, user_ids: list[int]) -> list[tuple[User, list[TrackPoint]]]:
    """Two ``objects()`` queries (users ``is_in(ids)``, then their points) grouped by a dict.

    Piccolo loads a foreign key forwards (``objects(TrackPoint.user_id)``, a JOIN)
    but has no reverse one-to-many loading: ``ForeignKey.reverse()`` is for
    unique keys, ``M2M`` for join tables. So the users' points are one more
    query on the foreign key, attached to their user by a dict lookup: what
    Tortoise's ``prefetch_related`` does.
    """
    users = await User.objects().where(User.id.is_in(user_ids)).output(load_json=True)
    points = await TrackPoint.objects().where(TrackPoint.user_id.is_in([u.id for u in users]))
    by_user: dict[int, list[TrackPoint]] = {u.id: [] for u in users}
    for point in points:
        by_user[point.user_id].append(point)
    return [(u, by_user[u.id]) for u in users]
