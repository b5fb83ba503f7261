"""How fast do the bulk-insert paths of async SQLAlchemy write N rows, how many statements
does each send (insertmanyvalues pages, one executemany, or COPY outside SQLAlchemy), do
RETURNING ids come back complete and in order, and what do an ON CONFLICT upsert and an
ORM bulk UPDATE by primary key actually change?

The same batch of track points is written six ways, each for its own user, and
each is counted afterwards with ``count(*)``: ``add_all`` + ``flush`` (the unit of
work), an ORM bulk ``session.execute(insert(TrackPoint), rows)``, ``insert()
.returning(TrackPoint.id)`` with and without ``sort_by_parameter_order``, a Core
``connection.execute(insert(table), rows)``, and COPY on the driver connection
behind an ``AsyncConnection`` (``(await conn.get_raw_connection()).driver_connection``):
asyncpg's ``copy_records_to_table``, psycopg's ``cursor.copy()``. The SQLAlchemy
``before_cursor_execute`` event says how many statements each sent and in which
style: one statement per "insertmanyvalues" page, one driver ``executemany``, or
nothing at all for COPY. Then an ``INSERT ... ON CONFLICT DO UPDATE`` upsert
(half existing usernames, half new, told apart with ``RETURNING (xmax = 0)``) and
an ORM bulk UPDATE by primary key.

Sources: SQLAlchemy docs, ORM querying guide "ORM-Enabled INSERT, UPDATE, and
DELETE statements" — "ORM Bulk INSERT Statements", "ORM Bulk UPDATE by Primary
Key", 'ORM "upsert" Statements'; Core "Working with Engines and Connections" —
'"Insert Many Values" Behavior for INSERT statements' (``insertmanyvalues_page_size``
defaults to 1000; "Correlating RETURNING rows to parameter sets",
``Insert.returning.sort_by_parameter_order``, new in 2.0.10); PostgreSQL dialect,
"INSERT...ON CONFLICT (Upsert)" (``set_`` does not apply ``Column.onupdate``
values); asyncpg API reference, ``Connection.copy_records_to_table``
(``schema_name``, ``columns``). Issue threads: sqlalchemy/sqlalchemy#11710
(support asyncpg ``copy_records_to_table``: not wrapped, use the driver
connection), #6832 (``driver_connection``), #5263 (executemany with RETURNING,
the origin of insertmanyvalues), #7650 (``insert().values(list)`` is one big
statement, parameters to ``execute`` use executemany); MagicStack/asyncpg#295
(pipelined ``executemany``), #556 and #346 (executemany vs COPY speed), #1055
(executemany UPDATE is prepared once and pipelined). PostgreSQL docs, INSERT:
"ON CONFLICT DO UPDATE command cannot affect row a second time".

Observed beside the sources: with asyncpg, rows WITHOUT RETURNING do not go
through insertmanyvalues at all (the dialect leaves
``use_insertmanyvalues_wo_returning`` off) but through one pipelined driver
``executemany``; COPY was only about 2-3x faster than that in our runs (of
20,000 rows), far from the 50x of asyncpg#556 (written before executemany was
pipelined); and the duplicate-key upsert error reaches the caller as a bare
``DBAPIError`` with asyncpg (a ``ProgrammingError`` with psycopg), not an
``IntegrityError``.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any

from psycopg import sql
from sqlalchemy import Boolean, Table, func, insert, literal_column, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from .lab import BadSizes, Execution, Lab, at_least, experiment, on, prefix, sqlstate
from .models import TrackPoint, User

COPY_COLUMNS = ("user_id", "lat", "lon", "date")
START = datetime(2024, 6, 1, tzinfo=UTC)
MAX_BIND_PARAMETERS = 32767
"""What one PostgreSQL statement can carry (the protocol counts them in an int16)."""
PAGE_SIZE = 1000
"""SQLAlchemy's default ``insertmanyvalues_page_size`` (the project never changes it; the
experiment reads the dialect's own value when it runs)."""


@dataclass(frozen=True)
class Sizes:
    rows: int = 2_500
    """Track points each bulk path writes (more than one insertmanyvalues page of 1000,
    the last one partial)."""
    upserts: int = 200
    """Usernames in the upsert: the first half exist already, the second half are new."""
    updates: int = 1_000
    """Rows the bulk UPDATE by primary key changes: every other row of a batch of `rows`."""

    def __post_init__(self) -> None:
        if self.rows <= PAGE_SIZE:
            raise BadSizes(
                f"rows ({self.rows}) must be more than {PAGE_SIZE}, SQLAlchemy's default "
                "insertmanyvalues page size: the rows must fill more than one page"
            )
        if not 1 <= self.updates <= (self.rows + 1) // 2:
            raise BadSizes(
                f"updates ({self.updates}) must be 1 to {(self.rows + 1) // 2}: the bulk "
                f"UPDATE changes every other row of a batch of rows ({self.rows})"
            )
        if not 2 <= self.upserts <= MAX_BIND_PARAMETERS // 2:
            raise BadSizes(
                f"upserts ({self.upserts}) must be 2 to {MAX_BIND_PARAMETERS // 2}: half "
                "existing and half new, in ONE statement of 2 bind parameters per row"
            )


run = experiment(8, "Bulk writes and upserts", Sizes)


# ---------------------------------------------------------------- what the driver got


def styles(sent: Sequence[Execution]) -> dict[str, int]:
    """How many statements of each verb and style: ``{"INSERT (INSERTMANYVALUES)": 3}``."""
    counts: dict[str, int] = {}
    for e in sent:
        key = f"{e.verb} ({e.style})"
        counts[key] = counts.get(key, 0) + 1
    return counts


def parameter_sets(sent: Sequence[Execution]) -> int:
    """The parameter sets of all these executions (an executemany carries many)."""
    return sum(e.parameter_sets for e in sent)


def with_text(sent: Sequence[Execution], part: str) -> int:
    """How many of these statements have ``part`` in their text."""
    return sum(part in e.statement for e in sent)


def out_of_order(values: Sequence[float], sent: Sequence[float]) -> int:
    """Positions where ``values`` differs from the order ``sent`` (missing ones count)."""
    return sum(a != b for a, b in zip(values, sent, strict=False)) + abs(len(values) - len(sent))


def not_ascending(ids: Sequence[int]) -> int:
    """Neighbours where the later id is not above the earlier one."""
    return sum(b <= a for a, b in pairwise(ids))


# ---------------------------------------------------------------- the rows


def lat_of(i: int) -> float:
    return 45.0 + (i % 1000) / 1000


def point_rows(user_id: int, rows: int) -> list[dict[str, Any]]:
    """``rows`` track points; ``lon`` = the row's index, so every row can be told apart."""
    return [
        {
            "user_id": user_id,
            "lat": lat_of(i),
            "lon": float(i),
            "date": START + timedelta(seconds=i),
        }
        for i in range(rows)
    ]


@dataclass
class Bulk:
    """What the bulk-write scenarios share: a user per path, the page arithmetic, and the
    write rate each path reached (for the COPY comparison)."""

    owner: dict[str, int]
    page: int
    """``insertmanyvalues_page_size``, read from the dialect."""
    rows: int
    rates: dict[str, float] = field(default_factory=dict)

    @property
    def pages(self) -> int:
        return math.ceil(self.rows / self.page)

    def record(self, lab: Lab[Sizes], name: str, seconds: float, sent: list[Execution]) -> None:
        """The path's write rate and write statements, as figures."""
        rate = self.rows / seconds
        self.rates[name] = rate
        lab.figure(name, rate, "rows/s")
        writes = sum(e.verb != "SELECT" for e in sent)
        lab.figure(f"{name}: write statements seen by events", writes, "statements")


PATHS = ("add_all", "orm_bulk", "returning", "returning_sorted", "core", "copy", "update")


@asynccontextmanager
async def bulk(lab: Lab[Sizes]) -> AsyncIterator[Bulk]:
    """One user per bulk path (each path writes its rows for its own user)."""
    async with lab.sessions.begin() as session:
        ids = (
            await session.scalars(
                insert(User).returning(User.id, sort_by_parameter_order=True),
                [{"username": lab.name(path)} for path in PATHS],
            )
        ).all()
    yield Bulk(
        dict(zip(PATHS, ids, strict=True)),
        lab.engine.dialect.insertmanyvalues_page_size,
        lab.sizes.rows,
    )


async def counted(session: AsyncSession, user_id: int) -> tuple[int, int]:
    """``count(*)`` and ``count(DISTINCT lon)`` of one user's track points."""
    row = (
        await session.execute(
            select(func.count(), func.count(TrackPoint.lon.distinct())).where(
                TrackPoint.user_id == user_id
            )
        )
    ).one()
    return int(row[0]), int(row[1])


async def check_written(lab: Lab[Sizes], user_id: int, name: str) -> None:
    async with lab.sessions() as session:
        count, distinct = await counted(session, user_id)
    rows = lab.sizes.rows
    lab.check(
        f"{name} wrote exactly the rows sent",
        "Each of the six bulk paths leaves exactly `rows` track points for its user, each "
        "row once (count(*) and count(DISTINCT lon)).",
        expected={"rows": rows, "distinct lon": rows},
        observed={"rows": count, "distinct lon": distinct},
    )


# ---------------------------------------------------------------- the six insert paths


@run.scenario
async def add_all_and_flush(lab: Lab[Sizes]) -> None:
    """`rows` TrackPoint objects in session.add_all, then one flush: what the unit of work
    sends."""
    data = await lab.use(bulk)
    owner = data.owner["add_all"]
    async with lab.sessions() as session:
        session.add_all(TrackPoint(**row) for row in point_rows(owner, lab.sizes.rows))
        with lab.executions() as sent:
            started = time.perf_counter()
            await session.flush()
            seconds = time.perf_counter() - started
        await session.commit()
    data.record(lab, "add_all + flush", seconds, sent)
    lab.check(
        "add_all + flush: the unit of work batches the INSERTs",
        "SQLAlchemy 2.x flushes new objects whose primary key comes from the server with "
        "insertmanyvalues too: one INSERT ... RETURNING id per page of "
        f"insertmanyvalues_page_size ({data.page}, read from the dialect) rows, not one per "
        "object; to hand each id to its object it uses the ordered (sen_counter) form.",
        expected={
            "statements": {"INSERT (INSERTMANYVALUES)": data.pages},
            "with RETURNING track_points.id": data.pages,
            "with ORDER BY sen_counter": data.pages,
        },
        observed={
            "statements": styles(sent),
            "with RETURNING track_points.id": with_text(sent, "RETURNING track_points.id"),
            "with ORDER BY sen_counter": with_text(sent, "ORDER BY sen_counter"),
        },
    )
    await check_written(lab, owner, "add_all + flush")


@run.scenario
async def orm_bulk_insert(lab: Lab[Sizes]) -> None:
    """session.execute(insert(TrackPoint), list_of_dicts), no RETURNING."""
    data = await lab.use(bulk)
    owner = data.owner["orm_bulk"]
    rows = point_rows(owner, lab.sizes.rows)
    async with lab.sessions() as session:
        with lab.executions() as sent:
            started = time.perf_counter()
            await session.execute(insert(TrackPoint), rows)
            seconds = time.perf_counter() - started
        await session.commit()
    data.record(lab, "ORM bulk insert(TrackPoint)", seconds, sent)
    lab.check(
        "ORM bulk INSERT without RETURNING: one driver executemany",
        "Without RETURNING, insertmanyvalues is not used on asyncpg (the dialect sets "
        "use_insertmanyvalues_wo_returning = False): the ORM hands all rows to one "
        "cursor.executemany(), which asyncpg pipelines (one event, every parameter set).",
        expected={"statements": {"INSERT (EXECUTEMANY)": 1}, "parameter sets": lab.sizes.rows},
        observed={"statements": styles(sent), "parameter sets": parameter_sets(sent)},
    )
    await check_written(lab, owner, "ORM bulk insert(TrackPoint)")


@run.scenario
async def insert_returning(lab: Lab[Sizes]) -> None:
    """session.execute(insert(TrackPoint).returning(id, lon), list_of_dicts): the pages
    sent, and the rows that come back, compared with the table and the input order."""
    data = await lab.use(bulk)
    rows = lab.sizes.rows
    owner = data.owner["returning"]
    async with lab.sessions() as session:
        with lab.executions() as sent:
            started = time.perf_counter()
            returned = (
                await session.execute(
                    insert(TrackPoint).returning(TrackPoint.id, TrackPoint.lon),
                    point_rows(owner, rows),
                )
            ).all()
            seconds = time.perf_counter() - started
        await session.commit()
    data.record(lab, "insert().returning(id)", seconds, sent)
    lab.check(
        "insert().returning(): one INSERT per insertmanyvalues page",
        f"With RETURNING, the rows are sent as ceil({rows} / {data.page}) = {data.pages} "
        "multi-row INSERT ... VALUES ... RETURNING statements (insertmanyvalues pages).",
        expected={
            "pages the rows fill": at_least(2),
            "statements": {"INSERT (INSERTMANYVALUES)": data.pages},
        },
        observed={"pages the rows fill": data.pages, "statements": styles(sent)},
    )
    ids = [int(r[0]) for r in returned]
    back_lon = [float(r[1]) for r in returned]
    async with lab.sessions() as session:
        stored = dict(
            (
                await session.execute(
                    select(TrackPoint.id, TrackPoint.lon).where(TrackPoint.user_id == owner)
                )
            ).all()
        )
    lab.check(
        "RETURNING gives every id, each the row sent",
        "insert().returning(id) through insertmanyvalues returns one row per row sent: all ids, "
        "distinct, and each returned (id, lon) is the stored row with that id.",
        expected={"ids": rows, "distinct": rows, "match the table": rows},
        observed={
            "ids": len(ids),
            "distinct": len(set(ids)),
            "match the table": sum(
                stored.get(i) == lon for i, lon in zip(ids, back_lon, strict=True)
            ),
        },
    )
    lab.check(
        "without sort_by_parameter_order the ids came back in input order (observed)",
        "Not guaranteed: the docs say the unsorted batch form does not guarantee that returned "
        "rows correspond to the order of the input. Observed on PostgreSQL: the plain "
        "INSERT ... VALUES (...), (...) RETURNING form (no sen_counter) still returned the "
        "rows in the order of the VALUES list.",
        expected={"statements with sen_counter": 0, "rows out of input order": 0},
        observed={
            "statements with sen_counter": with_text(sent, "sen_counter"),
            "rows out of input order": out_of_order(back_lon, [float(i) for i in range(rows)]),
        },
    )
    await check_written(lab, owner, "insert().returning(id)")


@run.scenario
async def insert_returning_sorted(lab: Lab[Sizes]) -> None:
    """The same insert().returning(id, lon) with sort_by_parameter_order=True."""
    data = await lab.use(bulk)
    rows = lab.sizes.rows
    owner = data.owner["returning_sorted"]
    async with lab.sessions() as session:
        with lab.executions() as sent:
            started = time.perf_counter()
            returned = (
                await session.execute(
                    insert(TrackPoint).returning(
                        TrackPoint.id, TrackPoint.lon, sort_by_parameter_order=True
                    ),
                    point_rows(owner, rows),
                )
            ).all()
            seconds = time.perf_counter() - started
        await session.commit()
    data.record(lab, "returning(sort_by_parameter_order)", seconds, sent)
    lab.check(
        "sort_by_parameter_order=True: rows back in input order, ids ascending",
        "With sort_by_parameter_order=True, PostgreSQL gets INSERT ... SELECT ... FROM "
        "(VALUES ..., sen_counter) ORDER BY sen_counter, so identity values are generated in "
        "parameter order and SQLAlchemy returns the rows in input order, still paged.",
        expected={
            "statements": {"INSERT (INSERTMANYVALUES)": data.pages},
            "with ORDER BY sen_counter": data.pages,
            "rows out of input order": 0,
            "ids not ascending": 0,
        },
        observed={
            "statements": styles(sent),
            "with ORDER BY sen_counter": with_text(sent, "ORDER BY sen_counter"),
            "rows out of input order": out_of_order(
                [float(r[1]) for r in returned], [float(i) for i in range(rows)]
            ),
            "ids not ascending": not_ascending([int(r[0]) for r in returned]),
        },
    )
    await check_written(lab, owner, "returning(sort_by_parameter_order)")


@run.scenario
async def core_insert(lab: Lab[Sizes]) -> None:
    """Core: connection.execute(insert(table), list_of_dicts) on an AsyncConnection."""
    data = await lab.use(bulk)
    owner = data.owner["core"]
    rows = point_rows(owner, lab.sizes.rows)
    table = TrackPoint.__table__
    assert isinstance(table, Table)
    async with lab.engine.connect() as conn:
        with lab.executions() as sent:
            started = time.perf_counter()
            await conn.execute(insert(table), rows)
            seconds = time.perf_counter() - started
        await conn.commit()
    data.record(lab, "Core connection.execute", seconds, sent)
    lab.check(
        "Core connection.execute(insert(table), rows): one driver executemany",
        "Core without RETURNING takes the same path as the ORM bulk insert: one "
        "cursor.executemany() with every parameter set.",
        expected={"statements": {"INSERT (EXECUTEMANY)": 1}, "parameter sets": lab.sizes.rows},
        observed={"statements": styles(sent), "parameter sets": parameter_sets(sent)},
    )
    await check_written(lab, owner, "Core connection.execute")


COPY_PATH = "COPY through the driver"
CARDINALITY = "ON CONFLICT DO UPDATE command cannot affect row a second time"


async def driver_copy(driver: Any, driver_name: str, schema: str, records: list[Any]) -> str:
    """COPY ``records`` into track_points with the driver's own API, below SQLAlchemy:
    asyncpg's ``copy_records_to_table``, psycopg's ``cursor.copy()`` (``COPY ... FROM
    STDIN``). Returns the driver's own report of it (``"COPY n"``)."""
    if driver_name == "asyncpg":
        return str(
            await driver.copy_records_to_table(
                TrackPoint.__tablename__,
                records=records,
                columns=list(COPY_COLUMNS),
                schema_name=schema,
            )
        )
    statement = sql.SQL("COPY {}.{} ({}) FROM STDIN").format(
        sql.Identifier(schema),
        sql.Identifier(TrackPoint.__tablename__),
        sql.SQL(", ").join(map(sql.Identifier, COPY_COLUMNS)),
    )
    async with driver.cursor() as cursor:
        async with cursor.copy(statement) as copy:
            for record in records:
                await copy.write_row(record)
        return f"COPY {cursor.rowcount}"


@run.scenario
async def copy_through_the_driver(lab: Lab[Sizes]) -> None:
    """COPY on the driver connection behind an AsyncConnection (asyncpg's
    copy_records_to_table, psycopg's cursor.copy()), another session counting the rows
    before and after conn.commit(); then how much faster COPY was than each path that ran
    before it."""
    data = await lab.use(bulk)
    rows = lab.sizes.rows
    owner = data.owner["copy"]
    records = [tuple(r[c] for c in COPY_COLUMNS) for r in point_rows(owner, rows)]
    async with lab.engine.connect() as conn:
        with lab.executions() as sent:
            schema = str(await conn.scalar(select(func.current_schema())))
            raw = await conn.get_raw_connection()
            driver = raw.driver_connection
            assert driver is not None, "no driver connection"
            started = time.perf_counter()
            status = await driver_copy(driver, lab.cell.driver, schema, records)
            seconds = time.perf_counter() - started
        async with lab.sessions() as other:
            before_commit = (await counted(other, owner))[0]
        await conn.commit()
    async with lab.sessions() as other:
        after_commit = (await counted(other, owner))[0]
    others = dict(data.rates)
    data.record(lab, COPY_PATH, seconds, sent)
    lab.check(
        "COPY bypasses SQLAlchemy's cursor events",
        "The COPY runs on the driver connection itself, below SQLAlchemy (SQLAlchemy wraps "
        "neither driver's COPY API): the cursor events see only SQLAlchemy's own statement "
        "(current_schema()), no COPY, although the driver reports the COPY it did.",
        expected={"statements seen by events": {"SELECT (EXECUTE)": 1}, "driver": f"COPY {rows}"},
        observed={"statements seen by events": styles(sent), "driver": status},
    )
    lab.check(
        "COPY on the driver connection is part of the SQLAlchemy transaction",
        "The AsyncConnection had begun its transaction (current_schema() ran first), so "
        "the COPY on the same driver connection is inside it: another session sees none of "
        "the rows before conn.commit() and all of them after.",
        expected={"before commit": 0, "after commit": rows},
        observed={"before commit": before_commit, "after commit": after_commit},
    )
    lab.note(f"COPY target schema from current_schema(): {schema}")
    await check_written(lab, owner, COPY_PATH)
    copy_rate = data.rates[COPY_PATH]
    for name, rate in others.items():
        lab.figure(f"{name}: COPY is this many times faster", copy_rate / rate, "x")


# ---------------------------------------------------------------- upsert, bulk update


@run.scenario
async def upsert_on_conflict(lab: Lab[Sizes]) -> None:
    """INSERT ... ON CONFLICT (username) DO UPDATE SET login_count: half the usernames
    exist (committed in an earlier transaction), half are new; RETURNING (xmax = 0)."""
    upserts = lab.sizes.upserts
    names = [lab.name(f"up-{i:05d}") for i in range(upserts)]
    existing, new = names[: upserts // 2], names[upserts // 2 :]
    async with lab.sessions.begin() as session:
        await session.execute(insert(User), [{"username": n} for n in existing])
    async with lab.sessions() as session:
        before = dict(
            (
                await session.execute(
                    select(User.username, User.updated_at).where(User.username.in_(existing))
                )
            ).all()
        )
    wanted = {n: 1000 + i for i, n in enumerate(names)}
    values = pg_insert(User).values([{"username": n, "login_count": c} for n, c in wanted.items()])
    stmt = values.on_conflict_do_update(
        index_elements=[User.username], set_={"login_count": values.excluded.login_count}
    ).returning(User.username, literal_column("(xmax = 0)", Boolean).label("inserted"))
    async with lab.sessions() as session:
        with lab.executions() as sent:
            started = time.perf_counter()
            flags = (await session.execute(stmt)).all()
            seconds = time.perf_counter() - started
        await session.commit()
    lab.figure("upsert (ON CONFLICT DO UPDATE)", upserts / seconds, "rows/s")
    inserted = {n for n, fresh in flags if fresh}
    updated = {n for n, fresh in flags if not fresh}
    lab.check(
        "upsert: new usernames inserted, existing ones updated",
        "One INSERT ... ON CONFLICT (username) DO UPDATE statement (a list given to "
        ".values()) inserts the new half and updates the existing half; RETURNING (xmax = 0) "
        "tells which row was inserted.",
        expected={
            "statements": {"INSERT (EXECUTE)": 1},
            "rows returned": upserts,
            "new inserted": len(new),
            "existing updated": len(existing),
            "existing inserted": 0,
            "new updated": 0,
        },
        observed={
            "statements": styles(sent),
            "rows returned": len(flags),
            "new inserted": len(inserted & set(new)),
            "existing updated": len(updated & set(existing)),
            "existing inserted": len(inserted & set(existing)),
            "new updated": len(updated & set(new)),
        },
    )
    async with lab.sessions() as session:
        final = (
            await session.execute(
                select(User.username, User.login_count, User.updated_at).where(
                    User.username.in_(names)
                )
            )
        ).all()
    lab.check(
        "upsert: final values are the ones sent",
        "After the upsert every username exists once and carries the login_count sent "
        "for it (excluded.login_count), for inserted and updated rows alike.",
        expected={"rows": upserts, "with the value sent": upserts},
        observed={
            "rows": len(final),
            "with the value sent": sum(wanted.get(n) == c for n, c, _ in final),
        },
    )
    onupdate = User.__table__.c.updated_at.onupdate
    do_update = sent[0].statement.partition(" DO UPDATE SET ")[2] if sent else ""
    lab.check(
        "upsert: ON CONFLICT DO UPDATE does not apply onupdate",
        "User.updated_at has onupdate=now(), but the set_ of on_conflict_do_update is "
        "rendered as given: the updated rows keep their old updated_at (the PostgreSQL "
        "dialect docs: onupdate values are not exercised unless put in set_).",
        expected={
            "users.updated_at onupdate (the model)": "now()",
            "DO UPDATE SET (sent)": "login_count = excluded.login_count",
            "existing rows the upsert updated": len(existing),
            "updated rows that kept updated_at": len(existing),
        },
        observed={
            "users.updated_at onupdate (the model)": (
                "none" if onupdate is None else str(getattr(onupdate, "arg", onupdate))
            ),
            "DO UPDATE SET (sent)": do_update.partition(" RETURNING ")[0],
            "existing rows the upsert updated": len(updated & set(existing)),
            "updated rows that kept updated_at": sum(
                n in before and before[n] == at for n, _, at in final
            ),
        },
    )


@run.scenario
async def upsert_same_key_twice(lab: Lab[Sizes]) -> None:
    """One INSERT ... ON CONFLICT DO UPDATE whose VALUES list names the same username twice."""
    twice = pg_insert(User).values(
        [{"username": lab.name("twice"), "login_count": k} for k in (1, 2)]
    )
    twice = twice.on_conflict_do_update(
        index_elements=[User.username], set_={"login_count": twice.excluded.login_count}
    )
    error: BaseException | None = None
    async with lab.sessions() as session:
        try:
            await session.execute(twice)
        except Exception as err:
            error = err
        await session.rollback()
    lab.check(
        "upsert: the same key twice in one statement fails",
        "PostgreSQL refuses an ON CONFLICT DO UPDATE that would touch the same row twice in "
        "one command: duplicate keys must be removed from the batch before sending it. "
        "Observed: with asyncpg it reaches the caller as a bare DBAPIError, with psycopg as "
        "a ProgrammingError (psycopg's class for SQLSTATE class 21, cardinality_violation); "
        "the SQLSTATE (21000) is the same.",
        expected={
            "raised": on(
                asyncpg=prefix(f"DBAPIError: {CARDINALITY}"),
                psycopg=prefix(f"ProgrammingError: {CARDINALITY}"),
            ),
            "SQLSTATE": "21000",
        },
        observed={
            "raised": error if error is not None else "nothing",
            "SQLSTATE": sqlstate(error) if error is not None else "none",
        },
    )


@run.scenario
async def bulk_update_by_primary_key(lab: Lab[Sizes]) -> None:
    """`rows` track points written with insert().returning(id), then
    session.execute(update(TrackPoint), list_of_dicts) changing every other one's lat."""
    data = await lab.use(bulk)
    async with lab.sessions.begin() as session:
        written = (
            await session.execute(
                insert(TrackPoint).returning(
                    TrackPoint.id, TrackPoint.lat, sort_by_parameter_order=True
                ),
                point_rows(data.owner["update"], lab.sizes.rows),
            )
        ).all()
    original = {int(i): float(lat) for i, lat in written}
    chosen = [int(i) for i, _ in written][::2][: lab.sizes.updates]
    changes: list[dict[str, Any]] = [
        {"id": i, "lat": -1.5 - len(chosen) + k} for k, i in enumerate(chosen)
    ]
    async with lab.sessions() as session:
        with lab.executions() as sent:
            started = time.perf_counter()
            await session.execute(update(TrackPoint), changes)
            seconds = time.perf_counter() - started
        await session.commit()
    lab.figure("ORM bulk UPDATE by primary key", len(changes) / seconds, "rows/s")
    lab.check(
        "bulk UPDATE by primary key: one executemany",
        "session.execute(update(TrackPoint), list_of_dicts) sends one UPDATE ... WHERE id = "
        "... through a single cursor.executemany() with one parameter set per row "
        "(asyncpg prepares it once and pipelines the executions).",
        expected={"statements": {"UPDATE (EXECUTEMANY)": 1}, "parameter sets": lab.sizes.updates},
        observed={"statements": styles(sent), "parameter sets": parameter_sets(sent)},
    )
    async with lab.sessions() as session:
        now = dict(
            (
                await session.execute(
                    select(TrackPoint.id, TrackPoint.lat).where(TrackPoint.id.in_(list(original)))
                )
            ).all()
        )
    untouched = set(original) - set(chosen)
    lab.check(
        "bulk UPDATE by primary key: exactly the rows sent changed",
        "Every row named in the list got its new lat; no other row of the batch changed.",
        expected={
            "rows read back": lab.sizes.rows,
            "changed": lab.sizes.updates,
            "changed as sent": lab.sizes.updates,
            "untouched": lab.sizes.rows - lab.sizes.updates,
        },
        observed={
            "rows read back": len(now),
            "changed": sum(now.get(i) != original[i] for i in original),
            "changed as sent": sum(now.get(c["id"]) == c["lat"] for c in changes),
            "untouched": sum(now.get(i) == original[i] for i in untouched),
        },
    )
