"""The rows a benchmark run reads and writes: seeded once, tagged, removed at the end.

Every user a run creates has a username starting with the run's tag
(``bench-<hex>-``); every track point belongs to such a user. So a run never
touches other data in the database (``users`` cascade to their track points on
delete), runs can repeat, and two runs on one database do not see each other.

What :meth:`Dataset.seed` creates (sizes from :class:`Sizes`):

- ``read_users`` users ``<tag>r00000…`` with ``login_count`` = their index: the
  keys of *get by primary key*; the first ``parents`` of them have ``children``
  track points each (*small filter*, *relationship load*);
- ``groups`` groups ``<tag>g00000…`` (two columns: ``id``, ``name``): the keys of
  *get by primary key, narrow row*;
- one user ``<tag>big`` with ``large`` track points (*large filter*, *tuples*);
- ``update_users`` users ``<tag>u…`` that *partial update* rewrites (their
  ``updated_at`` set back to ``created_at`` before each run);
- one writer user per task (``<tag>w<t>``) that *batch* and *bulk insert* add
  track points to (one per task, so concurrent inserts never share a parent row's
  key-share lock), and a user ``<tag>d`` whose points *delete* removes.

Track point ``k`` of any user has ``lon = k``, ``lat = 45 + (k % 1000) / 1000`` and
``date = START + k seconds``, so a check can tell every row from the others.
Seeding and checking go through SQLAlchemy Core on the project's own engine.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Table, delete, func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from ..db import Database
from ..lab.context import delete_tagged
from ..models import Group, TrackPoint, User

START = datetime(2024, 6, 1, tzinfo=UTC)
"""``date`` of track point 0; point ``k`` is ``k`` seconds later."""

Row = dict[str, Any]
"""One track point as an application holds it before saving: ``user_id, lat, lon, date``."""


def table_of(model: type[User] | type[TrackPoint] | type[Group]) -> Table:
    """A model's ``Table`` (typed as such: ``__table__`` is declared as a ``FromClause``)."""
    table = model.__table__
    assert isinstance(table, Table)
    return table


users = table_of(User)
points = table_of(TrackPoint)
groups = table_of(Group)


@dataclass(frozen=True)
class Sizes:
    """How many rows each part of the data set has and each operation touches."""

    read_users: int = 1000
    groups: int = 1000
    parents: int = 200
    children: int = 20
    small: int = 10
    parents_per_load: int = 20
    large: int = 1000
    update_users: int = 1000
    batch: int = 100
    bulk: int = 10_000


QUICK_SIZES = Sizes(
    read_users=200,
    groups=200,
    parents=40,
    children=10,
    small=5,
    parents_per_load=10,
    large=300,
    update_users=200,
    batch=100,
    bulk=1_000,
)


def lat_of(k: int) -> float:
    return 45.0 + (k % 1000) / 1000


def date_of(k: int) -> datetime:
    return START + timedelta(seconds=k)


def point_row(user_id: int, k: int) -> Row:
    """Track point ``k`` of ``user_id``, as a dict (what the write operations receive)."""
    return {"user_id": user_id, "lat": lat_of(k), "lon": float(k), "date": date_of(k)}


def new_tag() -> str:
    return f"bench-{secrets.token_hex(3)}-"


@dataclass
class Dataset:
    """The tagged rows of one run, and the SQL that seeds, inspects and removes them."""

    db: Database
    sizes: Sizes
    tag: str = field(default_factory=new_tag)
    read_ids: list[int] = field(default_factory=list)
    group_ids: list[int] = field(default_factory=list)
    big_id: int = 0
    update_ids: list[int] = field(default_factory=list)
    writer_ids: list[int] = field(default_factory=list)
    deleter_id: int = 0
    _serial: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    _rows: dict[tuple[int, int], list[Row]] = field(default_factory=dict)

    @property
    def parent_ids(self) -> list[int]:
        return self.read_ids[: self.sizes.parents]

    def serial(self) -> int:
        """A number never handed out before in this run (usernames, updated values)."""
        return next(self._serial)

    def rows(self, user_id: int, count: int) -> list[Row]:
        """Points ``0 … count-1`` of ``user_id``, built once and shared by the ops writing them."""
        key = (user_id, count)
        if key not in self._rows:
            self._rows[key] = [point_row(user_id, k) for k in range(count)]
        return self._rows[key]

    async def seed(self, writers: int) -> None:
        """Create the read, update, writer and deleter users and the points they read."""
        s = self.sizes
        if s.parents > s.read_users or s.small > s.children:
            raise ValueError(f"inconsistent sizes: {s}")
        async with self.db.engine.begin() as conn:
            names = [f"{self.tag}r{i:05d}" for i in range(s.read_users)]
            rows = [{"username": n, "login_count": i} for i, n in enumerate(names)]
            self.read_ids = await self._ids(conn, rows)
            named = [{"name": f"{self.tag}g{i:05d}"} for i in range(s.groups)]
            stmt = insert(groups).returning(groups.c.id, sort_by_parameter_order=True)
            self.group_ids = list((await conn.execute(stmt, named)).scalars())
            self.update_ids = await self._ids(
                conn, [{"username": f"{self.tag}u{i:05d}"} for i in range(s.update_users)]
            )
            others = [f"{self.tag}big", f"{self.tag}d"] + [
                f"{self.tag}w{t:02d}" for t in range(writers)
            ]
            self.big_id, self.deleter_id, *self.writer_ids = await self._ids(
                conn, [{"username": n} for n in others]
            )
            children = [point_row(uid, k) for uid in self.parent_ids for k in range(s.children)] + [
                point_row(self.big_id, k) for k in range(s.large)
            ]
            await conn.execute(insert(points), children)
        async with self.db.engine.connect() as conn:
            # fresh statistics, so the first reads are planned on what is really there
            await conn.execute(text("ANALYZE users, track_points, groups"))
            await conn.commit()

    async def _ids(self, conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> list[int]:
        stmt = insert(users).returning(users.c.id, sort_by_parameter_order=True)
        return list((await conn.execute(stmt, rows)).scalars())

    async def drop(self) -> None:
        """Delete every user of the run (and so every point): the run leaves nothing behind."""
        await delete_tagged(self.db.sessions, self.tag)

    # -- what the write operations leave, and how to clear it ------------------------

    async def clear_new_users(self) -> None:
        """Remove the users *single insert* created (``<tag>n…``)."""
        async with self.db.engine.begin() as conn:
            await conn.execute(delete(users).where(users.c.username.startswith(f"{self.tag}n")))

    async def unmove_updated_at(self, user_ids: Sequence[int]) -> None:
        """``updated_at = created_at`` again (as seeded) for these users where it moved."""
        stmt = (
            update(users)
            .where(users.c.id.in_(user_ids), users.c.updated_at != users.c.created_at)
            .values(updated_at=users.c.created_at)
        )
        async with self.db.engine.begin() as conn:
            await conn.execute(stmt)

    async def clear_points(self, user_ids: Sequence[int]) -> None:
        async with self.db.engine.begin() as conn:
            await conn.execute(delete(points).where(points.c.user_id.in_(user_ids)))

    async def seed_points(self, user_id: int, count: int, first: int = 0) -> list[int]:
        """Points ``first … first+count-1`` of ``user_id``; their ids, in that order."""
        if count == 0:
            return []
        rows = [point_row(user_id, k) for k in range(first, first + count)]
        stmt = insert(points).returning(points.c.id, sort_by_parameter_order=True)
        async with self.db.engine.begin() as conn:
            return list((await conn.execute(stmt, rows)).scalars())

    async def point_stats(self, user_ids: Sequence[int]) -> tuple[int, int, float, float, float]:
        """``count, count(DISTINCT lon), min(lon), max(lon), sum(lat)`` of these users' points."""
        stmt = select(
            func.count(),
            func.count(points.c.lon.distinct()),
            func.coalesce(func.min(points.c.lon), -1.0),
            func.coalesce(func.max(points.c.lon), -1.0),
            func.coalesce(func.sum(points.c.lat), 0.0),
        ).where(points.c.user_id.in_(user_ids))
        async with self.db.engine.connect() as conn:
            row = (await conn.execute(stmt)).one()
        return int(row[0]), int(row[1]), float(row[2]), float(row[3]), float(row[4])

    async def point_ids(self, user_id: int) -> list[int]:
        async with self.db.engine.connect() as conn:
            found = await conn.scalars(
                select(points.c.id).where(points.c.user_id == user_id).order_by(points.c.id)
            )
            return list(found)

    async def users_named(self, names: Sequence[str]) -> dict[str, int]:
        """``username → id`` of the users with these names."""
        async with self.db.engine.connect() as conn:
            rows = await conn.execute(
                select(users.c.username, users.c.id).where(users.c.username.in_(names))
            )
            return {name: uid for name, uid in rows}

    async def counters(self, user_ids: Sequence[int]) -> dict[int, tuple[int, bool]]:
        """``id → (login_count, updated_at > created_at)`` of these users."""
        async with self.db.engine.connect() as conn:
            rows = await conn.execute(
                select(
                    users.c.id, users.c.login_count, users.c.updated_at > users.c.created_at
                ).where(users.c.id.in_(user_ids))
            )
            return {uid: (count, bool(moved)) for uid, count, moved in rows}
