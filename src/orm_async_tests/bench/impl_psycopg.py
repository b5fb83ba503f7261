"""Raw psycopg 3 (async): the other driver's limit, as :mod:`.impl_asyncpg` is asyncpg's.

One ``psycopg_pool.AsyncConnectionPool`` of ``pool_size`` connections (min = max,
opened with the implementation); each task holds one connection for its ops. The
connections are set up for speed, the way an application that cares would:

- **autocommit**: each single statement runs in its own implicit transaction,
  which is atomic, and no ``BEGIN``/``COMMIT`` round trips are added;
- **server-side prepared statements** from the first execution
  (``prepare_threshold=0``; by default psycopg prepares a query only after
  five runs of it): each statement is parsed and planned once per connection;
- **binary results** for reads (``binary=True``): numbers, timestamps and UUIDs
  are decoded from their binary form instead of parsed from text (~1.3x on
  1,000-row reads here); for that the ``user_status`` enum gets psycopg's enum
  loader (``register_enum``, once per new connection), which returns
  :class:`~orm_async_tests.models.UserStatus` members;
- ``namedtuple_row`` rows: read by name (``row.id``) like asyncpg's records; in
  two quick interleaved measurements (both binary) 6-13 % faster than
  ``dict_row`` on 1,000-row reads, no clear difference on one-row reads (one
  dict per row against a tuple of a class cached per column list);
  ``tuple_row`` for the plain tuples.

JSONB comes back as ``dict``, arrays as lists: psycopg's default loaders.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import namedtuple_row, tuple_row
from psycopg.types.enum import EnumInfo, register_enum
from psycopg_pool import AsyncConnectionPool

from ..models import UserStatus
from .cases import Environment, Implementation
from .connect import server_params
from .dataset import Row
from .operations import SmallFilter, Update

Conn = AsyncConnection[Any]
USER_COLUMNS = "id, username, status, profile, login_count, public_id, tags, created_at, updated_at"
POINT_COLUMNS = "id, user_id, lat, lon, date, created_at"


async def _configure(conn: Conn) -> None:
    """Load ``user_status`` values as :class:`UserStatus` (needed with binary results:
    psycopg returns a type it has no loader for as bytes)."""
    info = await EnumInfo.fetch(conn, "user_status")
    if info is None:
        raise LookupError("type user_status not found: is the database migrated?")
    register_enum(info, conn, UserStatus)


class Psycopg(Implementation[Conn]):
    key = "psycopg"
    label = "psycopg"

    def __init__(self) -> None:
        super().__init__()
        self.pool: AsyncConnectionPool[Conn] | None = None

    async def open(self, env: Environment) -> None:
        params = server_params(env.db.target, env.db.settings, env.application_name)
        kwargs: dict[str, Any] = {
            **params.psycopg_kwargs(),
            "autocommit": True,
            "prepare_threshold": 0,
            "row_factory": namedtuple_row,
        }
        self.pool = AsyncConnectionPool(
            kwargs=kwargs,
            min_size=env.pool_size,
            max_size=env.pool_size,
            open=False,
            configure=_configure,
            name="bench-psycopg",
        )
        await self.pool.open(wait=True)

    @asynccontextmanager
    async def task(self) -> AsyncIterator[Conn]:
        assert self.pool is not None
        async with self.pool.connection() as conn:
            yield conn

    async def close(self) -> None:
        if self.pool is not None:
            pool, self.pool = self.pool, None
            await pool.close()


IMPL = Psycopg()


async def _one(conn: Conn, query: str, params: tuple[Any, ...]) -> Any:
    """The single row of a prepared, binary-result query."""
    cursor = await conn.execute(query, params, binary=True)
    return await cursor.fetchone()


async def _all(conn: Conn, query: str, params: tuple[Any, ...]) -> list[Any]:
    """Every row of a prepared, binary-result query."""
    cursor = await conn.execute(query, params, binary=True)
    return await cursor.fetchall()


@IMPL.case("insert_single")
async def insert_single(conn: Conn, username: str) -> int:
    """``execute(INSERT … RETURNING id)`` on an autocommit connection: one round trip.

    Prepared once per connection; the implicit transaction of a single statement
    is its commit.
    """
    row = await _one(conn, "INSERT INTO users (username) VALUES (%s) RETURNING id", (username,))
    user_id: int = row.id
    return user_id


_UNNEST_INSERT = (
    "INSERT INTO track_points (user_id, lat, lon, date) "
    "SELECT * FROM unnest(%b::bigint[], %b::float8[], %b::float8[], %b::timestamptz[])"
)


def _arrays(rows: list[Row]) -> tuple[list[Any], ...]:
    """The rows as one list per column, for ``unnest``."""
    return (
        [r["user_id"] for r in rows],
        [r["lat"] for r in rows],
        [r["lon"] for r in rows],
        [r["date"] for r in rows],
    )


@IMPL.case("insert_batch")
async def insert_batch(conn: Conn, rows: list[Row]) -> None:
    """One ``INSERT … SELECT * FROM unnest(%b, %b, %b, %b)``: four binary arrays, one statement.

    The same SQL as asyncpg's column: the text is the same for any batch size, so
    prepared once, and the server inserts every row in one execution, where
    ``executemany`` sends one Bind/Execute per row. ``%b`` sends the arrays in
    binary: ~1.5x the rate of ``%s``, with which psycopg dumps lists as text
    (then no faster than ``executemany``). A binary COPY (as below) was ~10 %
    faster still at 100 rows, within the noise of one quick measurement. One
    statement, so atomic.
    """
    await conn.execute(_UNNEST_INSERT, _arrays(rows))


_COPY = "COPY track_points (user_id, lat, lon, date) FROM STDIN (FORMAT BINARY)"
_COPY_TYPES = ("int8", "float8", "float8", "timestamptz")


@IMPL.case("insert_bulk")
async def insert_bulk(conn: Conn, rows: list[Row]) -> None:
    """``cursor.copy(COPY … FROM STDIN (FORMAT BINARY))`` + ``write_row``: binary COPY.

    The column types are given (``set_types``), so every value is dumped in
    binary with no type lookup, and psycopg sends the rows in large buffers: no
    SQL per row, no statement to plan (at 10,000 rows ~1.2x both a text COPY and
    the binary ``unnest`` INSERT above). COPY is one command, so atomic.
    """
    async with conn.cursor().copy(_COPY) as copy:
        copy.set_types(_COPY_TYPES)
        for r in rows:
            await copy.write_row((r["user_id"], r["lat"], r["lon"], r["date"]))


@IMPL.case("update_partial")
async def update_partial(conn: Conn, item: Update) -> None:
    """``execute(UPDATE users SET login_count = %s, updated_at = now() WHERE id = %s)``.

    One prepared statement, one round trip, autocommit; ``updated_at`` written
    by hand, as raw SQL knows nothing of the model's ``onupdate``.
    """
    await conn.execute(
        "UPDATE users SET login_count = %s, updated_at = now() WHERE id = %s",
        (item.login_count, item.user_id),
    )


@IMPL.case("delete")
async def delete(conn: Conn, point_id: int) -> None:
    """``execute(DELETE FROM track_points WHERE id = %s)``: one round trip, autocommit."""
    await conn.execute("DELETE FROM track_points WHERE id = %s", (point_id,))


@IMPL.case("get_by_pk")
async def get_by_pk(conn: Conn, user_id: int) -> Any:
    """``execute(SELECT … WHERE id = %s, binary=True)`` + ``fetchone()``: one named tuple."""
    return await _one(conn, f"SELECT {USER_COLUMNS} FROM users WHERE id = %s", (user_id,))


@IMPL.case("get_narrow")
async def get_narrow(conn: Conn, group_id: int) -> Any:
    """``execute(SELECT id, name FROM groups WHERE id = %s)``: a two-field named tuple."""
    return await _one(conn, "SELECT id, name FROM groups WHERE id = %s", (group_id,))


@IMPL.case("filter_small")
async def filter_small(conn: Conn, item: SmallFilter) -> list[Any]:
    """``execute(SELECT … WHERE user_id = %s AND date >= %s)`` + ``fetchall()``."""
    return await _all(
        conn,
        f"SELECT {POINT_COLUMNS} FROM track_points WHERE user_id = %s AND date >= %s",
        (item.user_id, item.since),
    )


@IMPL.case("filter_large")
async def filter_large(conn: Conn, user_id: int) -> list[Any]:
    """``execute(SELECT … WHERE user_id = %s, binary=True)``: named tuples, binary-decoded.

    Binary results spare parsing 6,000 numbers and timestamps from text; the
    rows are built by psycopg's C extension.
    """
    return await _all(
        conn, f"SELECT {POINT_COLUMNS} FROM track_points WHERE user_id = %s", (user_id,)
    )


@IMPL.case("filter_tuples")
async def filter_tuples(conn: Conn, user_id: int) -> list[tuple[Any, ...]]:
    """A ``tuple_row`` cursor: plain tuples, the cheapest row psycopg builds."""
    cursor = conn.cursor(row_factory=tuple_row, binary=True)
    await cursor.execute(
        "SELECT id, lat, lon, date FROM track_points WHERE user_id = %s", (user_id,)
    )
    return await cursor.fetchall()


@IMPL.case("relationship")
async def relationship(conn: Conn, user_ids: list[int]) -> list[tuple[Any, list[Any]]]:
    """Two prepared SELECTs (parents ``= ANY(%s)``, then their children) grouped in Python.

    The same two statements as asyncpg's column: an array parameter, so one
    prepared statement for any number of parents, and the children attached
    to their parent by a dict lookup.
    """
    parents = await _all(
        conn, f"SELECT {USER_COLUMNS} FROM users WHERE id = ANY(%s::bigint[])", (user_ids,)
    )
    children = await _all(
        conn,
        f"SELECT {POINT_COLUMNS} FROM track_points WHERE user_id = ANY(%s::bigint[])",
        ([p.id for p in parents],),
    )
    by_parent: dict[int, list[Any]] = {p.id: [] for p in parents}
    for child in children:
        by_parent[child.user_id].append(child)
    return [(p, by_parent[p.id]) for p in parents]
