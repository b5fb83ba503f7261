"""The fastest correct SQLAlchemy patterns we found, one per operation.

Four things win, measured while choosing them (the table below):

1. **Core statements built once, at import.** A module-level ``select()`` /
   ``insert()`` / ``update()`` with ``bindparam()`` placeholders is compiled once
   per engine (the compiled cache) and prepared once per connection (the asyncpg
   dialect's prepared-statement cache); an op only binds values. Building the
   statement in each call costs a cache-key walk every time, and ``lambda_stmt``
   (its closure analysis per call) was no faster than that.
2. **Rows, not ORM objects.** A ``Row`` (a named tuple with attribute access to
   every column) skips the identity map, instance state and attribute
   instrumentation: most of an ORM read's cost. The columns are the ones the
   ORM would load.
3. **An AUTOCOMMIT connection per task**, from an engine made with
   ``isolation_level="AUTOCOMMIT"``. (Not ``engine.execution_options(
   isolation_level=...)``: that ``OptionEngine`` sets the level through an event
   listener, and an engine with any listener dispatches four events on every execute:
   see :mod:`.attempts`, where it was measured.) SQLAlchemy's
   asyncpg dialect otherwise sends ``BEGIN`` before the first statement and
   ``COMMIT`` after: three round trips for a one-statement write. Every op here
   is ONE statement (the relationship load: two reads, which under READ
   COMMITTED see no less than inside a transaction), and PostgreSQL runs a
   single statement atomically, so autocommit gives nothing up. For reads it
   changes nothing (a task's connection would hold one transaction anyway).
4. **Many rows in one statement:** ``INSERT … SELECT * FROM unnest(:user_id,
   :lat, :lon, :date)`` written with Core (``func.unnest(...).table_valued(...)``):
   four array parameters, one statement (atomic, prepared once) whatever the
   row count, where ``executemany`` sends a Bind/Execute per row and
   insertmanyvalues a statement per 1000 rows.

The engine comes from the db module like everywhere else, with
``pool_use_lifo=True``: the most recently used connection is handed out again,
whose prepared statements are warm (the default FIFO pool cycles through every
connection; asyncpg's own pool is LIFO too).

What else was measured while choosing (ops/s, concurrency 1 / 10, one
development run on this 2-core machine with this benchmark's runner; not
re-measured by the command)::

    get by primary key    Core select(users) built once (chosen)               3,990 / 6,690
                          ORM select(User) built once, AUTOCOMMIT session      3,330 / 5,680
                          session.get(User, id)                                3,000 / 3,990
                          Core select() built in each call                     2,660 / 4,200
                          lambda_stmt                                          2,550 / 4,270
                          conn.exec_driver_sql(sql, (id,)): SQL text           4,980 / 9,830
    batch insert (100)    Core unnest INSERT (chosen)                            909 / 1,520
                          Core executemany: execute(insert(t), rows)               465 / 840
                          insert().returning(id): insertmanyvalues                 428 / 680
                          ORM bulk: session.execute(insert(TrackPoint), rows)      353 / 598
    bulk insert (10,000)  Core unnest INSERT (chosen)                            12.7 / 18.4
                          asyncpg COPY through driver_connection                 15.7 / 21.0
                          Core executemany                                         8.8 / 9.7
                          insert().returning(id): 10 statements                   6.7 / 13.7
    single insert         Core insert().returning(id), AUTOCOMMIT (chosen)     2,260 / 7,220
                          the same in a transaction + commit()                 1,420 / 4,580
                          ORM insert(User).returning(User.id) + commit()         978 / 1,670
    large filter (1,000)  Core rows (chosen)                                       492 / 491
                          ORM objects: select(TrackPoint) built once               156 / 178
    filter → tuples       Core .all() (chosen)                                     713 / 739
                          stream() + yield_per(500)                                368 / 480
                          exec_driver_sql                                          765 / 692
    relationship load     Core: two statements + a dict (chosen)                   553 / 608
                          ORM selectinload, AUTOCOMMIT session                     192 / 244
                          ORM joinedload + unique()                                147 / 178
                          Core: one JOIN statement                                 309 / 318

Two faster routes were left out on purpose: ``exec_driver_sql`` (SQL text in the
driver's ``$1`` style: SQLAlchemy as a mere pool, ~20-45 % faster than Core for
a primary-key read) and asyncpg's COPY through ``driver_connection`` (~20 %
faster than ``unnest`` at 10,000 rows): both are asyncpg under SQLAlchemy's
pool, not SQLAlchemy's SQL layer, and the asyncpg column already measures that.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    Double,
    Row,
    any_,
    bindparam,
    delete as sa_delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncConnection

from ..db import Database
from .cases import Environment, Implementation
from .dataset import Row as PointRow, groups, points, users
from .operations import SmallFilter, Update


class SqlalchemyBest(Implementation[AsyncConnection]):
    key = "sqlalchemy_best"
    label = "SA best Core"

    def __init__(self) -> None:
        super().__init__()
        self.db: Database | None = None

    async def open(self, env: Environment) -> None:
        self.db = env.open_database(self.driver, pool_use_lifo=True, isolation_level="AUTOCOMMIT")

    @asynccontextmanager
    async def task(self) -> AsyncIterator[AsyncConnection]:
        assert self.db is not None
        async with self.db.engine.connect() as conn:
            yield conn

    async def close(self) -> None:
        if self.db is not None:
            await self.db.dispose()
            self.db = None


IMPL = SqlalchemyBest()

INSERT_USER = insert(users).returning(users.c.id)


@IMPL.case("insert_single")
async def insert_single(conn: AsyncConnection, username: str) -> int:
    """Core ``insert(users).returning(users.c.id)``, built once, on the AUTOCOMMIT connection.

    One round trip (asyncpg's: ``INSERT … RETURNING id``) instead of the ORM's
    BEGIN / INSERT RETURNING every default / COMMIT and the pool checkout between
    ops; only the id comes back, as asked.
    """
    result = await conn.execute(INSERT_USER, {"username": username})
    user_id: int = result.scalar_one()
    return user_id


_columns = (
    func.unnest(
        bindparam("user_id", type_=ARRAY(BigInteger)),
        bindparam("lat", type_=ARRAY(Double)),
        bindparam("lon", type_=ARRAY(Double)),
        bindparam("date", type_=ARRAY(DateTime(timezone=True))),
    )
    .table_valued("user_id", "lat", "lon", "date")
    .render_derived()
)
INSERT_POINTS = insert(points).from_select(
    ["user_id", "lat", "lon", "date"],
    select(_columns.c.user_id, _columns.c.lat, _columns.c.lon, _columns.c.date),
)


def _arrays(rows: Sequence[PointRow]) -> dict[str, list[Any]]:
    return {
        "user_id": [r["user_id"] for r in rows],
        "lat": [r["lat"] for r in rows],
        "lon": [r["lon"] for r in rows],
        "date": [r["date"] for r in rows],
    }


@IMPL.case("insert_batch")
async def insert_batch(conn: AsyncConnection, rows: list[PointRow]) -> None:
    """Core ``insert().from_select(select(func.unnest(...)))``: one statement, four arrays.

    The same SQL as asyncpg's column (``INSERT … SELECT * FROM unnest(…)``),
    built with Core once: one execution for the whole batch, so atomic on the
    AUTOCOMMIT connection. ``insert().returning()`` (insertmanyvalues: one
    ``VALUES (…), (…)`` statement up to 1000 rows, its text different for each
    batch size) and Core or ORM bulk ``executemany`` (a Bind/Execute per row)
    reached about half of its rate.
    """
    await conn.execute(INSERT_POINTS, _arrays(rows))


@IMPL.case("insert_bulk")
async def insert_bulk(conn: AsyncConnection, rows: list[PointRow]) -> None:
    """The same ``unnest`` INSERT for every row: one statement, one round trip.

    At 10,000 rows it reaches ~80-90 % of asyncpg's COPY, where ``executemany``
    sends 10,000 Bind/Execute messages and insertmanyvalues 10 statements (which,
    on an AUTOCOMMIT connection, would not even be atomic). COPY itself is
    reachable inside a SQLAlchemy transaction (``(await
    conn.get_raw_connection()).driver_connection.copy_records_to_table``), but
    that is asyncpg, not SQLAlchemy, and bypasses its events.
    """
    await conn.execute(INSERT_POINTS, _arrays(rows))


UPDATE_LOGIN_COUNT = (
    update(users)
    .where(users.c.id == bindparam("b_id"))
    .values(login_count=bindparam("b_login_count"))
)


@IMPL.case("update_partial")
async def update_partial(conn: AsyncConnection, item: Update) -> None:
    """Core ``update(users).where(id == :id).values(login_count=:n)``: no SELECT first.

    One statement; the model's ``onupdate`` still sets ``updated_at = now()``
    (Core applies column ``onupdate``, a raw SQL string would not).
    """
    await conn.execute(
        UPDATE_LOGIN_COUNT, {"b_id": item.user_id, "b_login_count": item.login_count}
    )


DELETE_POINT = sa_delete(points).where(points.c.id == bindparam("b_id"))


@IMPL.case("delete")
async def delete(conn: AsyncConnection, point_id: int) -> None:
    """Core ``delete(track_points).where(id == :id)``: one statement, no SELECT first."""
    await conn.execute(DELETE_POINT, {"b_id": point_id})


GET_USER = select(users).where(users.c.id == bindparam("b_id"))


@IMPL.case("get_by_pk")
async def get_by_pk(conn: AsyncConnection, user_id: int) -> Row[Any]:
    """Core ``select(users).where(id == :id)``, built once: one ``Row`` with every column.

    ``session.get`` answers from the identity map only for an object the session
    already holds; for a key it does not, it is an ORM query plus an object:
    1.3-1.7x slower than this here.
    """
    return (await conn.execute(GET_USER, {"b_id": user_id})).one()


GET_GROUP = select(groups).where(groups.c.id == bindparam("b_id"))


@IMPL.case("get_narrow")
async def get_narrow(conn: AsyncConnection, group_id: int) -> Row[Any]:
    """Core ``select(groups).where(id == :id)``, built once: a two-column ``Row``."""
    return (await conn.execute(GET_GROUP, {"b_id": group_id})).one()


SMALL_FILTER = select(points).where(
    points.c.user_id == bindparam("b_user_id"), points.c.date >= bindparam("b_since")
)


@IMPL.case("filter_small")
async def filter_small(conn: AsyncConnection, item: SmallFilter) -> Sequence[Row[Any]]:
    """Core ``select(track_points).where(...)``, built once: ``Row`` objects."""
    result = await conn.execute(SMALL_FILTER, {"b_user_id": item.user_id, "b_since": item.since})
    return result.all()


POINTS_OF_USER = select(points).where(points.c.user_id == bindparam("b_user_id"))


@IMPL.case("filter_large")
async def filter_large(conn: AsyncConnection, user_id: int) -> Sequence[Row[Any]]:
    """Core ``select(track_points)`` → ``Row`` objects: no identity map, no instance state.

    The ORM spends most of a large read creating instances and registering them
    in the session (ORM objects ran at a third of this rate); ``Row`` keeps
    attribute access to every column without that.
    """
    return (await conn.execute(POINTS_OF_USER, {"b_user_id": user_id})).all()


TUPLES_OF_USER = select(points.c.id, points.c.lat, points.c.lon, points.c.date).where(
    points.c.user_id == bindparam("b_user_id")
)


@IMPL.case("filter_tuples")
async def filter_tuples(conn: AsyncConnection, user_id: int) -> Sequence[Row[Any, Any, Any, Any]]:
    """Core ``select(id, lat, lon, date)`` → ``.all()``: ``Row`` objects, tuple-like already.

    A ``Row`` indexes, unpacks and compares like a tuple; ``Result.tuples()``
    only changes the typing and is deprecated in 2.1 (it warns). ``stream()`` with
    ``yield_per`` pays off only when the rows do not fit in memory: for 1,000 rows
    the server-side cursor's extra round trips halved the rate.
    """
    return (await conn.execute(TUPLES_OF_USER, {"b_user_id": user_id})).all()


PARENTS = select(users).where(users.c.id == any_(bindparam("b_ids", type_=ARRAY(BigInteger))))
CHILDREN = select(points).where(
    points.c.user_id == any_(bindparam("b_ids", type_=ARRAY(BigInteger)))
)


@IMPL.case("relationship")
async def relationship(
    conn: AsyncConnection, user_ids: list[int]
) -> list[tuple[Row[Any], list[Row[Any]]]]:
    """What ``selectinload`` does, on Core rows: parents, children ``= ANY(:ids)``, a dict.

    Two statements built once (an array parameter, so one prepared statement
    for any number of parents, where ``IN (…)`` expands per count), and the
    children attached to their parent by a dict lookup instead of the ORM's
    collection loading. The ORM's ``selectinload`` ran at ~40 % of this rate,
    ``joinedload`` (one statement repeating each parent's columns per child,
    plus ``unique()``) at ~30 %, a single Core JOIN at ~55 %.
    """
    parents = (await conn.execute(PARENTS, {"b_ids": user_ids})).all()
    children = await conn.execute(CHILDREN, {"b_ids": [p.id for p in parents]})
    by_parent: dict[int, list[Row[Any]]] = {p.id: [] for p in parents}
    for child in children:
        by_parent[child.user_id].append(child)
    return [(p, by_parent[p.id]) for p in parents]
