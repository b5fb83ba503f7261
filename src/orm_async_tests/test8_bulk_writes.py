"""Experiment 8: bulk writes and upserts.

The same batch of track points is written six ways, each for its own user, and
each is counted afterwards with ``count(*)``: ``add_all`` + ``flush`` (the unit of
work), an ORM bulk ``session.execute(insert(TrackPoint), rows)``, ``insert()
.returning(TrackPoint.id)`` with and without ``sort_by_parameter_order``, a Core
``connection.execute(insert(table), rows)``, and asyncpg's
``copy_records_to_table`` on the driver connection behind an ``AsyncConnection``
(``(await conn.get_raw_connection()).driver_connection``). The SQLAlchemy
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
``executemany``; COPY was only about 2-3x faster than that in our runs, far
from the 50x of asyncpg#556 (written before executemany was pipelined); and the
duplicate-key upsert error reaches the caller as a bare ``DBAPIError``, not a
``ProgrammingError`` or ``IntegrityError``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Boolean, Table, event, func, insert, literal_column, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from .harness import Lab, experiment, outcome
from .models import TrackPoint, User

COPY_COLUMNS = ("user_id", "lat", "lon", "date")
START = datetime(2024, 6, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Execution:
    """One ``before_cursor_execute`` event: what SQLAlchemy handed to the driver."""

    verb: str
    style: str  # EXECUTE, EXECUTEMANY or INSERTMANYVALUES (the context's execute_style)
    parameter_sets: int  # executemany: how many sets; one statement otherwise
    statement: str


@contextmanager
def executions(engine: AsyncEngine) -> Iterator[list[Execution]]:
    """Like ``lab.statements()``, but keeps the execute style and the parameter-set count."""
    seen: list[Execution] = []

    def record(
        conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool
    ) -> None:
        style = getattr(getattr(context, "execute_style", None), "name", "EXECUTE")
        sets = len(params) if style == "EXECUTEMANY" else 1
        verb = statement.lstrip().split(None, 1)[0].upper() if statement.strip() else ""
        seen.append(Execution(verb, style, sets, " ".join(statement.split())))

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", record)


def styles(sent: Sequence[Execution]) -> str:
    """``"20 INSERT (INSERTMANYVALUES)"``-like summary, in order of first appearance."""
    counts: dict[tuple[str, str], int] = {}
    for e in sent:
        counts[(e.verb, e.style)] = counts.get((e.verb, e.style), 0) + 1
    return ", ".join(f"{n} {verb} ({style})" for (verb, style), n in counts.items()) or "none"


def with_sets(sent: Sequence[Execution]) -> str:
    """:func:`styles` and the parameter sets of them all: ``"1 INSERT (EXECUTEMANY) with 20
    parameter sets"`` says one executemany of that verb carried all 20."""
    return f"{styles(sent)} with {sum(e.parameter_sets for e in sent)} parameter sets"


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


@dataclass
class Method:
    name: str
    seconds: float
    sent: list[Execution]
    count: tuple[int, int] = (0, 0)


@experiment(8, "Bulk writes and upserts")
async def run(lab: Lab, *, rows: int = 20_000, upserts: int = 2_000, updates: int = 10_000) -> None:
    """How fast do the bulk-insert paths of async SQLAlchemy write N rows, how many statements
    does each send (insertmanyvalues pages, one executemany, or COPY outside SQLAlchemy),
    do RETURNING ids come back complete and in order, and what do an ON CONFLICT upsert and
    an ORM bulk UPDATE by primary key actually change?"""
    page = lab.engine.dialect.insertmanyvalues_page_size
    pages = math.ceil(rows / page)
    names = ["add_all", "orm_bulk", "returning", "returning_sorted", "core", "copy"]
    async with lab.sessions.begin() as session:
        owner = dict(
            zip(
                names,
                (
                    await session.scalars(
                        insert(User).returning(User.id, sort_by_parameter_order=True),
                        [{"username": f"{lab.tag}{name}"} for name in names],
                    )
                ).all(),
                strict=True,
            )
        )
    methods: dict[str, Method] = {}

    # 1. add_all + flush: the unit of work
    async with lab.sessions() as session:
        session.add_all(TrackPoint(**row) for row in point_rows(owner["add_all"], rows))
        with executions(lab.engine) as sent, lab.statements() as texts:
            started = time.perf_counter()
            await session.flush()
            seconds = time.perf_counter() - started
        await session.commit()
    methods["add_all"] = Method("add_all + flush", seconds, sent)
    inserts = [e for e in sent if e.verb == "INSERT"]
    returning_id = all("RETURNING track_points.id" in t for t in texts)
    ordered = all("ORDER BY sen_counter" in e.statement for e in inserts)
    lab.check(
        "add_all + flush: the unit of work batches the INSERTs",
        "SQLAlchemy 2.x flushes new objects whose primary key comes from the server with "
        "insertmanyvalues too: one INSERT ... RETURNING id per page of "
        f"insertmanyvalues_page_size ({page}, read from the dialect) rows, not one per object; "
        "to hand each id to its object it uses the ordered (sen_counter) form.",
        expected=f"{pages} INSERT (INSERTMANYVALUES), RETURNING id, ORDER BY sen_counter",
        observed=f"{styles(sent)}, RETURNING id: {returning_id}, ORDER BY sen_counter: {ordered}",
        passed=len(inserts) == pages == len(sent)
        and all(e.style == "INSERTMANYVALUES" for e in inserts)
        and returning_id
        and ordered,
    )

    # 2. ORM bulk INSERT: session.execute(insert(Model), list_of_dicts), no RETURNING
    data = point_rows(owner["orm_bulk"], rows)
    async with lab.sessions() as session:
        with executions(lab.engine) as sent:
            started = time.perf_counter()
            await session.execute(insert(TrackPoint), data)
            seconds = time.perf_counter() - started
        await session.commit()
    methods["orm_bulk"] = Method("ORM bulk insert(TrackPoint)", seconds, sent)
    lab.check(
        "ORM bulk INSERT without RETURNING: one driver executemany",
        "Without RETURNING, insertmanyvalues is not used on asyncpg (the dialect sets "
        "use_insertmanyvalues_wo_returning = False): the ORM hands all rows to one "
        "cursor.executemany(), which asyncpg pipelines (one event, every parameter set).",
        expected=f"1 INSERT (EXECUTEMANY) with {rows} parameter sets",
        observed=with_sets(sent),
    )

    # 3. insert().returning(TrackPoint.id): insertmanyvalues pages
    data = point_rows(owner["returning"], rows)
    async with lab.sessions() as session:
        with executions(lab.engine) as sent:
            started = time.perf_counter()
            returned = (
                await session.execute(
                    insert(TrackPoint).returning(TrackPoint.id, TrackPoint.lon), data
                )
            ).all()
            seconds = time.perf_counter() - started
        await session.commit()
    methods["returning"] = Method("insert().returning(id)", seconds, sent)
    lab.check(
        "insert().returning(): one INSERT per insertmanyvalues page",
        f"With RETURNING, the rows are sent as ceil({rows} / {page}) = {pages} multi-row "
        "INSERT ... VALUES ... RETURNING statements (insertmanyvalues pages).",
        expected=f"{pages} INSERT (INSERTMANYVALUES)",
        observed=styles(sent),
        passed=len(sent) == pages and all(e.style == "INSERTMANYVALUES" for e in sent),
    )
    ids = [int(r[0]) for r in returned]
    back_lon = [float(r[1]) for r in returned]
    async with lab.sessions() as session:
        stored = dict(
            (
                await session.execute(
                    select(TrackPoint.id, TrackPoint.lon).where(
                        TrackPoint.user_id == owner["returning"]
                    )
                )
            ).all()
        )
    matching = sum(stored.get(i) == lon for i, lon in zip(ids, back_lon, strict=True))
    lab.check(
        "RETURNING gives every id, each the row sent",
        "insert().returning(id) through insertmanyvalues returns one row per row sent: all ids, "
        "distinct, and each returned (id, lon) is the stored row with that id.",
        expected=f"{rows} ids, {rows} distinct, {rows} match the table",
        observed=f"{len(ids)} ids, {len(set(ids))} distinct, {matching} match the table",
        passed=len(ids) == len(set(ids)) == matching == rows,
    )
    sent_lon = [float(i) for i in range(rows)]
    plain = not any("sen_counter" in e.statement for e in sent)
    lab.check(
        "without sort_by_parameter_order the ids came back in input order (observed)",
        "Not guaranteed: the docs say the unsorted batch form does not guarantee that returned "
        "rows correspond to the order of the input. Observed on PostgreSQL: the plain "
        "INSERT ... VALUES (...), (...) RETURNING form (no sen_counter) still returned the "
        "rows in the order of the VALUES list.",
        expected="plain VALUES form; returned in input order",
        observed=f"{'plain VALUES form' if plain else 'sen_counter form'}; returned "
        f"{'in input order' if back_lon == sent_lon else 'out of order'}",
    )

    # 3b. the same with sort_by_parameter_order=True
    data = point_rows(owner["returning_sorted"], rows)
    async with lab.sessions() as session:
        with executions(lab.engine) as sent:
            started = time.perf_counter()
            returned = (
                await session.execute(
                    insert(TrackPoint).returning(
                        TrackPoint.id, TrackPoint.lon, sort_by_parameter_order=True
                    ),
                    data,
                )
            ).all()
            seconds = time.perf_counter() - started
        await session.commit()
    methods["returning_sorted"] = Method("returning(sort_by_parameter_order)", seconds, sent)
    sorted_lon = [float(r[1]) for r in returned]
    sorted_ids = [int(r[0]) for r in returned]
    sentinel = all("ORDER BY sen_counter" in e.statement for e in sent)
    lab.check(
        "sort_by_parameter_order=True: rows back in input order, ids ascending",
        "With sort_by_parameter_order=True, PostgreSQL gets INSERT ... SELECT ... FROM "
        "(VALUES ..., sen_counter) ORDER BY sen_counter, so identity values are generated in "
        "parameter order and SQLAlchemy returns the rows in input order, still paged.",
        expected=f"{pages} INSERT (INSERTMANYVALUES), ORDER BY sen_counter; input order; "
        "ids ascending",
        observed=f"{styles(sent)}, ORDER BY sen_counter: {sentinel}; "
        f"{'input order' if sorted_lon == sent_lon else 'out of order'}; ids "
        f"{'ascending' if sorted_ids == sorted(sorted_ids) else 'not ascending'}",
        passed=len(sent) == pages
        and sentinel
        and sorted_lon == sent_lon
        and sorted_ids == sorted(sorted_ids),
    )

    # 4. Core: connection.execute(insert(table), rows)
    data = point_rows(owner["core"], rows)
    table = TrackPoint.__table__
    assert isinstance(table, Table)
    async with lab.engine.connect() as conn:
        with executions(lab.engine) as sent:
            started = time.perf_counter()
            await conn.execute(insert(table), data)
            seconds = time.perf_counter() - started
        await conn.commit()
    methods["core"] = Method("Core connection.execute", seconds, sent)
    lab.check(
        "Core connection.execute(insert(table), rows): one driver executemany",
        "Core without RETURNING takes the same path as the ORM bulk insert: one "
        "cursor.executemany() with every parameter set.",
        expected=f"1 INSERT (EXECUTEMANY) with {rows} parameter sets",
        observed=with_sets(sent),
    )

    # 5. asyncpg COPY through the driver connection
    records = [tuple(r[c] for c in COPY_COLUMNS) for r in point_rows(owner["copy"], rows)]
    async with lab.engine.connect() as conn:
        with executions(lab.engine) as sent:
            schema = str(await conn.scalar(select(func.current_schema())))
            raw = await conn.get_raw_connection()
            driver = raw.driver_connection
            assert driver is not None, "no driver connection"
            started = time.perf_counter()
            status = await driver.copy_records_to_table(
                TrackPoint.__tablename__,
                records=records,
                columns=list(COPY_COLUMNS),
                schema_name=schema,
            )
            seconds = time.perf_counter() - started
        async with lab.sessions() as other:
            before_commit = (await counted(other, owner["copy"]))[0]
        await conn.commit()
    async with lab.sessions() as other:
        after_commit = (await counted(other, owner["copy"]))[0]
    methods["copy"] = Method("asyncpg copy_records_to_table", seconds, sent)
    copies = [e for e in sent if e.verb == "COPY"]
    lab.check(
        "COPY bypasses SQLAlchemy's cursor events",
        "copy_records_to_table runs on the asyncpg connection itself, below SQLAlchemy: the "
        "cursor events see only SQLAlchemy's own statement (current_schema()), no COPY, "
        "although asyncpg reports the COPY it did.",
        expected=f"events: 1 SELECT (EXECUTE), 0 COPY; asyncpg: 'COPY {rows}'",
        observed=f"events: {styles(sent)}, {len(copies)} COPY; asyncpg: {status!r}",
        passed=len(sent) == 1
        and sent[0].verb == "SELECT"
        and not copies
        and status == f"COPY {rows}",
    )
    lab.check(
        "COPY on the driver connection is part of the SQLAlchemy transaction",
        "The AsyncConnection had begun its transaction (current_schema() ran first), so "
        "the COPY on the same driver connection is inside it: another session sees none of "
        "the rows before conn.commit() and all of them after.",
        expected=f"0 before commit, {rows} after",
        observed=f"{before_commit} before commit, {after_commit} after",
        passed=before_commit == 0 and after_commit == rows,
    )
    lab.note(f"COPY target schema from current_schema(): {schema}")

    async with lab.sessions() as session:
        for key, method in methods.items():
            method.count = await counted(session, owner[key])
    lab.check(
        "every method wrote exactly the rows sent",
        "Each of the six bulk paths leaves exactly `rows` track points for its user, each "
        "row once (count(*) and count(DISTINCT lon)).",
        expected="; ".join(f"{m.name}: {rows}/{rows}" for m in methods.values()),
        observed="; ".join(f"{m.name}: {m.count[0]}/{m.count[1]}" for m in methods.values()),
    )
    copy_rate = rows / methods["copy"].seconds
    for method in methods.values():
        rate = rows / method.seconds
        lab.figure(f"{method.name}", rate, "rows/s")
        writes = sum(e.verb != "SELECT" for e in method.sent)
        lab.figure(f"{method.name}: write statements seen by events", writes, "statements")
        if method is not methods["copy"]:
            lab.figure(f"{method.name}: COPY is this many times faster", copy_rate / rate, "x")

    await upsert(lab, upserts)
    await bulk_update(lab, ids, back_lon, updates=updates)


async def upsert(lab: Lab, upserts: int) -> None:
    """INSERT ... ON CONFLICT (username) DO UPDATE: half the usernames exist, half are new."""
    names = [f"{lab.tag}up-{i:05d}" for i in range(upserts)]
    existing = names[: upserts // 2]
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
        with executions(lab.engine) as sent:
            started = time.perf_counter()
            flags = (await session.execute(stmt)).all()
            seconds = time.perf_counter() - started
        await session.commit()
    lab.figure("upsert (ON CONFLICT DO UPDATE)", upserts / seconds, "rows/s")
    inserted = {n for n, new in flags if new}
    updated = {n for n, new in flags if not new}
    lab.check(
        "upsert: new usernames inserted, existing ones updated",
        "One INSERT ... ON CONFLICT (username) DO UPDATE statement (a list given to "
        ".values()) inserts the new half and updates the existing half; RETURNING (xmax = 0) "
        "tells which row was inserted.",
        expected=f"1 INSERT (EXECUTE); inserted {upserts - len(existing)} new, "
        f"updated {len(existing)} existing",
        observed=f"{styles(sent)}; inserted {len(inserted - set(existing))} new"
        f"{f' (+{len(inserted & set(existing))} existing)' if inserted & set(existing) else ''}"
        f", updated {len(updated & set(existing))} existing"
        f"{f' (+{len(updated - set(existing))} new)' if updated - set(existing) else ''}",
        passed=len(sent) == 1
        and inserted == set(names) - set(existing)
        and updated == set(existing),
    )
    async with lab.sessions() as session:
        final = (
            await session.execute(
                select(User.username, User.login_count, User.updated_at).where(
                    User.username.in_(names)
                )
            )
        ).all()
    right = sum(wanted.get(n) == c for n, c, _ in final)
    kept = sum(n in before and before[n] == at for n, _, at in final)
    lab.check(
        "upsert: final values are the ones sent",
        "After the upsert every username exists once and carries the login_count sent "
        "for it (excluded.login_count), for inserted and updated rows alike.",
        expected=f"{upserts} rows, {upserts} with the value sent",
        observed=f"{len(final)} rows, {right} with the value sent",
        passed=len(final) == right == upserts,
    )
    lab.check(
        "upsert: ON CONFLICT DO UPDATE does not apply onupdate",
        "User.updated_at has onupdate=now(), but the set_ of on_conflict_do_update is "
        "rendered as given: the updated rows keep their old updated_at (the PostgreSQL "
        "dialect docs: onupdate values are not exercised unless put in set_).",
        expected=f"{len(existing)} of {len(existing)} updated rows keep updated_at",
        observed=f"{kept} of {len(existing)} updated rows keep updated_at",
        passed=kept == len(existing),
    )
    twice = pg_insert(User).values(
        [{"username": f"{lab.tag}twice", "login_count": k} for k in (1, 2)]
    )
    twice = twice.on_conflict_do_update(
        index_elements=[User.username], set_={"login_count": twice.excluded.login_count}
    )
    async with lab.sessions() as session:
        error = await outcome(session.execute(twice))
        await session.rollback()
    lab.check(
        "upsert: the same key twice in one statement fails",
        "PostgreSQL refuses an ON CONFLICT DO UPDATE that would touch the same row twice in "
        "one command: duplicate keys must be removed from the batch before sending it.",
        expected="an error: ... ON CONFLICT DO UPDATE command cannot affect row a second time",
        observed=error,
        passed="cannot affect row a second time" in error,
    )


async def bulk_update(
    lab: Lab,
    ids: list[int],
    lons: list[float],
    *,
    updates: int,
) -> None:
    """ORM bulk UPDATE by primary key on the rows insert().returning() wrote."""
    original = {i: lat_of(int(lon)) for i, lon in zip(ids, lons, strict=True)}
    chosen = ids[::2][:updates]
    changes: list[dict[str, Any]] = [
        {"id": i, "lat": -1.5 - len(chosen) + k} for k, i in enumerate(chosen)
    ]
    async with lab.sessions() as session:
        with executions(lab.engine) as sent:
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
        expected=f"1 UPDATE (EXECUTEMANY) with {len(changes)} parameter sets",
        observed=with_sets(sent),
    )
    expected = dict(original)
    expected.update({c["id"]: c["lat"] for c in changes})
    async with lab.sessions() as session:
        now = dict(
            (
                await session.execute(
                    select(TrackPoint.id, TrackPoint.lat).where(TrackPoint.id.in_(list(original)))
                )
            ).all()
        )
    changed = sum(now.get(i) != original[i] for i in original)
    as_sent = sum(now.get(c["id"]) == c["lat"] for c in changes)
    untouched = sum(now.get(i) == original[i] for i in set(original) - set(chosen))
    lab.check(
        "bulk UPDATE by primary key: exactly the rows sent changed",
        "Every row named in the list got its new lat; no other row of the batch changed.",
        expected=f"{len(changes)} changed, all as sent; {len(original) - len(changes)} untouched",
        observed=f"{changed} changed, {as_sent} as sent; {untouched} untouched",
        passed=changed == as_sent == len(changes)
        and untouched == len(original) - len(changes)
        and now == expected,
    )
