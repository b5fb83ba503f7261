"""Raw asyncpg: the limit every other column is measured against.

One ``asyncpg.Pool`` of ``pool_size`` connections; each task holds one connection
for its ops. asyncpg prepares every statement once per connection (its statement
cache) and reuses it; each single statement runs in its own implicit transaction
(autocommit), which is atomic. JSONB is decoded to dicts by a codec set on each
new connection, as any application would, so ``profile`` comes back as the other
implementations return it. Hand-written SQL, no object mapping: nothing to pay
but the protocol and the Python records. (asyncpg ships no type hints, so its
objects are ``Any`` here.)
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from .cases import Environment, Implementation
from .connect import server_params
from .dataset import Row
from .operations import SmallFilter, Update

USER_COLUMNS = "id, username, status, profile, login_count, public_id, tags, created_at, updated_at"
POINT_COLUMNS = "id, user_id, lat, lon, date, created_at"
COPY_COLUMNS = ("user_id", "lat", "lon", "date")


async def _init(conn: Any) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


class Asyncpg(Implementation[Any]):
    key = "asyncpg"
    label = "asyncpg"

    def __init__(self) -> None:
        super().__init__()
        self.pool: Any = None

    async def open(self, env: Environment) -> None:
        params = server_params(env.db.target, env.db.settings, env.application_name)
        self.pool = await asyncpg.create_pool(
            **params.asyncpg_kwargs(),
            min_size=env.pool_size,
            max_size=env.pool_size,
            init=_init,
        )

    @asynccontextmanager
    async def task(self) -> AsyncIterator[Any]:
        async with self.pool.acquire() as conn:
            yield conn

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
            self.pool = None


IMPL = Asyncpg()


@IMPL.case("insert_single")
async def insert_single(conn: Any, username: str) -> int:
    """``fetchval(INSERT … RETURNING id)``: one round trip, autocommit.

    The statement is prepared once per connection and executed with one
    parameter; the implicit transaction of a single statement is its commit.
    """
    user_id: int = await conn.fetchval(
        "INSERT INTO users (username) VALUES ($1) RETURNING id", username
    )
    return user_id


_UNNEST_INSERT = (
    "INSERT INTO track_points (user_id, lat, lon, date) "
    "SELECT * FROM unnest($1::bigint[], $2::float8[], $3::float8[], $4::timestamptz[])"
)


@IMPL.case("insert_batch")
async def insert_batch(conn: Any, rows: list[Row]) -> None:
    """One ``INSERT … SELECT * FROM unnest($1, $2, $3, $4)``: four arrays, one statement.

    The batch travels as one array per column, so the statement text is the same
    for any batch size (prepared once) and the server inserts every row in one
    execution: faster than ``executemany`` (one Bind/Execute per row) and than
    COPY (which first asks the server for the table's column types) at 100 rows.
    One statement, so atomic.
    """
    await conn.execute(
        _UNNEST_INSERT,
        [r["user_id"] for r in rows],
        [r["lat"] for r in rows],
        [r["lon"] for r in rows],
        [r["date"] for r in rows],
    )


@IMPL.case("insert_bulk")
async def insert_bulk(conn: Any, rows: list[Row]) -> None:
    """``copy_records_to_table``: the COPY protocol, binary rows streamed to the table.

    No SQL per row and no statement to plan; COPY is one command, so atomic.
    """
    await conn.copy_records_to_table(
        "track_points",
        columns=COPY_COLUMNS,
        records=[(r["user_id"], r["lat"], r["lon"], r["date"]) for r in rows],
    )


@IMPL.case("update_partial")
async def update_partial(conn: Any, item: Update) -> None:
    """``execute(UPDATE users SET login_count = $2, updated_at = now() WHERE id = $1)``.

    One statement, one round trip, autocommit; ``updated_at`` written by hand
    because raw SQL knows nothing of the model's ``onupdate``.
    """
    await conn.execute(
        "UPDATE users SET login_count = $2, updated_at = now() WHERE id = $1",
        item.user_id,
        item.login_count,
    )


@IMPL.case("delete")
async def delete(conn: Any, point_id: int) -> None:
    """``execute(DELETE FROM track_points WHERE id = $1)``: one round trip, autocommit."""
    await conn.execute("DELETE FROM track_points WHERE id = $1", point_id)


@IMPL.case("get_by_pk")
async def get_by_pk(conn: Any, user_id: int) -> Any:
    """``fetchrow(SELECT … WHERE id = $1)``: a prepared statement, one ``Record``."""
    return await conn.fetchrow(f"SELECT {USER_COLUMNS} FROM users WHERE id = $1", user_id)


@IMPL.case("get_narrow")
async def get_narrow(conn: Any, group_id: int) -> Any:
    """``fetchrow(SELECT id, name FROM groups WHERE id = $1)``: a two-column ``Record``."""
    return await conn.fetchrow("SELECT id, name FROM groups WHERE id = $1", group_id)


@IMPL.case("filter_small")
async def filter_small(conn: Any, item: SmallFilter) -> Any:
    """``fetch(SELECT … WHERE user_id = $1 AND date >= $2)``: a list of ``Record``."""
    return await conn.fetch(
        f"SELECT {POINT_COLUMNS} FROM track_points WHERE user_id = $1 AND date >= $2",
        item.user_id,
        item.since,
    )


@IMPL.case("filter_large")
async def filter_large(conn: Any, user_id: int) -> Any:
    """``fetch(SELECT … WHERE user_id = $1)``: every row decoded in C into ``Record``."""
    return await conn.fetch(f"SELECT {POINT_COLUMNS} FROM track_points WHERE user_id = $1", user_id)


@IMPL.case("filter_tuples")
async def filter_tuples(conn: Any, user_id: int) -> Any:
    """``fetch(SELECT id, lat, lon, date …)``: ``Record`` is already a tuple."""
    return await conn.fetch(
        "SELECT id, lat, lon, date FROM track_points WHERE user_id = $1", user_id
    )


@IMPL.case("relationship")
async def relationship(conn: Any, user_ids: list[int]) -> list[tuple[Any, list[Any]]]:
    """Two prepared SELECTs (parents ``= ANY($1)``, then their children) grouped in Python.

    The same two statements ``selectinload`` sends, with the children attached
    to their parent by a dict lookup.
    """
    parents = await conn.fetch(f"SELECT {USER_COLUMNS} FROM users WHERE id = ANY($1)", user_ids)
    children = await conn.fetch(
        f"SELECT {POINT_COLUMNS} FROM track_points WHERE user_id = ANY($1)",
        [p["id"] for p in parents],
    )
    by_parent: dict[int, list[Any]] = {p["id"]: [] for p in parents}
    for child in children:
        by_parent[child["user_id"]].append(child)
    return [(p, by_parent[p["id"]]) for p in parents]
