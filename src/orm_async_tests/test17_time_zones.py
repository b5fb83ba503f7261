"""Which instant does PostgreSQL store for a naive datetime, an aware UTC one and an aware
+05:30 one, in a ``timestamp`` and in a ``timestamptz`` column, through asyncpg and through
psycopg, when the application's time zone (``TZ``) differs from the session's
``TimeZone``; which tzinfo comes back; and what makes the stored instant right everywhere?

All three values written here mean one instant, 2024-01-15 12:00 UTC: the naive one by the
common "naive means UTC" convention (what ``datetime.utcnow()`` returns), the aware ones by
their offset. They are written through an ``AsyncSession`` into a scratch table with a
``DateTime()`` (``timestamp``) and a ``DateTime(timezone=True)`` (``timestamptz``) column,
from a child process whose ``TZ`` (Asia/Tokyo, +09:00, by default) differs from the
session ``TimeZone`` the engine asks for at connect time (Pacific/Honolulu, -10:00);
neither zone has DST, and their offsets differ, so every shift below names its source.
For each cell the experiment records whether the write was accepted, the instant stored
(read back on the server with ``extract(epoch ...)``, which no session setting changes;
for a ``timestamp`` the wall clock, read as UTC as the convention does), the shift from
the intended instant in hours, and the value and tzinfo SQLAlchemy returns.

Observed: the two drivers fail in opposite ways, and two of each driver's failures are
silent. asyncpg encodes parameters itself, in binary, for the column's type: it refuses
an aware datetime for a ``timestamp`` (``DataError`` "can't subtract offset-naive and
offset-aware datetimes"), and it converts a naive datetime for a ``timestamptz`` with
Python's ``astimezone()``, i.e. in the *process's* local time (``TZ``): stored 9 hours
early, with no error. psycopg sends a naive datetime as ``timestamp`` and an aware one as
``timestamptz`` and lets the server cast to the column's type in the *session's*
``TimeZone``: an aware value written to a ``timestamp`` is stored as Honolulu wall time
(10 hours early), a naive value written to a ``timestamptz`` is taken as Honolulu time (10
hours late), and it reads back with the same wall clock, so a round trip in that session
looks right while the stored instant is wrong. A ``timestamptz`` comes back in UTC from
asyncpg whatever the session says, and in the session's ``TimeZone`` (a ``ZoneInfo``)
from psycopg. The fix: ``DateTime(timezone=True)`` columns and aware values (the aware
rows are right on both drivers whatever the zones); with UTC everywhere (``TZ=UTC`` and
``TimeZone=UTC``) a naive value slipping through is harmless too and both drivers return
``datetime.timezone.utc``. Where a ``timestamp`` column has to stay, SQLAlchemy's
``TypeDecorator`` recipe that stores aware values as naive UTC and refuses naive ones
gives the right instant through both drivers. Last, the ``PGTZ`` environment variable
sets the session ``TimeZone`` with psycopg (libpq reads it) and is ignored by asyncpg.

Sources: PostgreSQL docs 8.5.1.3 "Time Stamps" (a ``timestamptz`` is stored as UTC; a
value without an offset is taken in the session ``TimeZone``; conversions between
``timestamp`` and ``timestamptz`` assume the ``timestamp`` is local time of
``TimeZone``) and 8.5.3 "Time Zones"; libpq docs 34.15 "Environment Variables" (``PGTZ``
sets the default time zone); SQLAlchemy docs, ``DateTime`` (``timezone=True``) and
"TypeDecorator Recipes" - "Store Timezone Aware Timestamps as Timezone Naive UTC" (the
``TZDateTime`` recipe used here); psycopg 3 docs, "Adapting basic Python types" - dates and
times (naive datetimes are dumped as ``timestamp``, aware ones as ``timestamptz``;
``timestamptz`` is loaded in the connection's ``TimeZone``). Issue threads, as observed:
MagicStack/asyncpg#1139 (an aware datetime for a ``timestamp`` column: "can't subtract
offset-naive and offset-aware datetimes", confirmed; psycopg converts instead, silently),
MagicStack/asyncpg#1006 (a ``timestamptz`` comes back in UTC, not in the session's zone:
confirmed; py-pgproto#21, the proposed change to convert to the local zone, is not in
the asyncpg observed), MagicStack/asyncpg#985 (``PGTZ`` is not respected: confirmed, and
psycopg does respect it), MagicStack/asyncpg#474 (naive ``datetime.now()`` /
``utcnow()`` values written to ``timestamptz`` columns read back shifted: consistent with
what is observed here, a naive value taken in the process's ``TZ``). psycopg's own dumpers
(``DatetimeNoTzDumper`` is ``timestamp``, ``DatetimeDumper`` ``timestamptz``) match the
server-side casts observed.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import Column, DateTime, Dialect, MetaData, String, Table, insert, select, text
from sqlalchemy.exc import StatementError
from sqlalchemy.pool import NullPool
from sqlalchemy.types import TypeDecorator

from .db import Database, open_database
from .lab import BadSizes, Lab, child, describe, experiment, matches, not_, on

INTENDED = datetime(2024, 1, 15, 12, 0, tzinfo=UTC)
"""The one instant every value written here means."""
PLUS_0530 = timezone(timedelta(hours=5, minutes=30))
VALUES: dict[str, datetime] = {
    "naive": INTENDED.replace(tzinfo=None),  # the "naive means UTC" convention
    "aware UTC": INTENDED,
    "aware +05:30": INTENDED.astimezone(PLUS_0530),  # 17:30+05:30, the same instant
}
COLUMNS = {"timestamp": "ts", "timestamptz": "tstz"}
"""The PostgreSQL type of each scratch column, and its name."""
RECIPE = "timestamp through the TZDateTime recipe"

REFUSED_AWARE = matches(
    r"^DBAPIError: invalid input for query argument \$\d+: .*"
    r"can't subtract offset-naive and offset-aware datetimes"
)
"""How asyncpg refuses an aware datetime for a ``timestamp`` parameter."""


@dataclass(frozen=True)
class Sizes:
    child_tz: str = "Asia/Tokyo"
    """TZ of the child process that writes (an IANA zone name), its local time."""
    session_tz: str = "Pacific/Honolulu"
    """The session TimeZone the child's engine asks for at connect time (an IANA zone)."""
    child_timeout: float = 60.0
    """Seconds each child process may run before it is killed."""

    def __post_init__(self) -> None:
        offsets = {}
        for name in ("child_tz", "session_tz"):
            key = getattr(self, name)
            try:
                offsets[name] = offset_of(key)
            except (ZoneInfoNotFoundError, ValueError) as exc:
                raise BadSizes(f"{name}={key!r}: zoneinfo does not know it ({exc})") from None
            if offsets[name] == timedelta(0):
                raise BadSizes(
                    f"{name}={key!r} is UTC at {INTENDED:%Y-%m-%d %H:%M}: with a zero offset "
                    "every shift this experiment looks for is zero"
                )
        if abs(offsets["child_tz"]) == abs(offsets["session_tz"]):
            raise BadSizes(
                "child_tz and session_tz need offsets of different sizes at the instant, so "
                "that a shift tells which of the two zones caused it"
            )
        if self.child_timeout <= 0:
            raise BadSizes("child_timeout must be positive")


run = experiment(17, "Time zones: naive and aware datetimes, timestamp and timestamptz", Sizes)


# ---------------------------------------------------------------- zones and values
def offset_of(zone: str) -> timedelta:
    """The UTC offset of ``zone`` at the intended instant (the zones here have no DST)."""
    found = INTENDED.astimezone(ZoneInfo(zone)).utcoffset()
    if found is None:
        raise ValueError(f"{zone} has no UTC offset")
    return found


def hours(delta: timedelta) -> float:
    return delta.total_seconds() / 3600


def tz_label(value: tzinfo | None) -> str:
    """How a returned tzinfo is named in the checks."""
    if value is None:
        return "none (naive)"
    if value is UTC:
        return "datetime.timezone.utc"
    if isinstance(value, ZoneInfo):
        return f"ZoneInfo('{value.key}')"
    return f"{type(value).__name__} {value}"


def stored_text(instant: datetime) -> str:
    return f"{instant.astimezone(UTC):%Y-%m-%d %H:%M} UTC"


def written(shift_h: float, returned: datetime) -> dict[str, Any]:
    """The expectation of an accepted write: the instant stored ``shift_h`` hours from the
    intended one, and what SQLAlchemy returns."""
    return {
        "written": "ok",
        "stored, as UTC": stored_text(INTENDED + timedelta(hours=shift_h)),
        "shift (h)": shift_h,
        "returned": returned.isoformat(),
        "returned tzinfo": tz_label(returned.tzinfo),
    }


def refused(error: Any) -> dict[str, Any]:
    """The expectation of a refused write: the error, and nothing stored or returned."""
    return {
        "written": error,
        "stored, as UTC": None,
        "shift (h)": None,
        "returned": None,
        "returned tzinfo": None,
    }


BRIEF = ("written", "shift (h)", "returned tzinfo")
"""The fields of a cell that the checks over several values compare."""


def brief(per_value: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Several cells as one flat mapping: ``"naive: shift (h)"``, ..."""
    return {f"{name}: {part}": cell[part] for name, cell in per_value.items() for part in BRIEF}


def per_driver(*, asyncpg: dict[str, Any], psycopg: dict[str, Any]) -> dict[str, Any]:
    """Two expectations with the same keys as one: ``on(...)`` only where they differ."""
    return {
        key: value if value == psycopg[key] else on(asyncpg=value, psycopg=psycopg[key])
        for key, value in asyncpg.items()
    }


def wall(zone: str) -> datetime:
    """The intended instant as the wall clock of ``zone`` (naive)."""
    return INTENDED.astimezone(ZoneInfo(zone)).replace(tzinfo=None)


def taken_in(zone: str) -> datetime:
    """The naive 12:00 taken as local time of ``zone``: the instant a cast stores."""
    return INTENDED.replace(tzinfo=ZoneInfo(zone))


# ---------------------------------------------------------------- the scratch table
class TZDateTime(TypeDecorator[datetime]):
    """SQLAlchemy's recipe for a ``timestamp`` column that must hold UTC: aware values are
    converted to naive UTC, naive values refused; what comes back is aware UTC."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None:
            if value.tzinfo is None or value.utcoffset() is None:
                raise TypeError("tzinfo is required")
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None else None


def stamps(name: str, *, recipe: bool = False) -> Table:
    """The scratch table: ``ts timestamp``, ``tstz timestamptz``, one row per cell (``key``);
    with ``recipe`` the ``ts`` column is typed ``TZDateTime`` on the Python side."""
    return Table(
        name,
        MetaData(),
        Column("key", String(120), primary_key=True),
        Column("ts", TZDateTime() if recipe else DateTime()),
        Column("tstz", DateTime(timezone=True)),
    )


def table_name(lab: Lab[Sizes]) -> str:
    return f"{lab.tag.replace('-', '_')}stamps"


@asynccontextmanager
async def scratch_table(lab: Lab[Sizes]) -> AsyncIterator[str]:
    """The scratch table in the run's schema, created once and dropped after the run."""
    table = stamps(table_name(lab))
    async with lab.engine.begin() as conn:
        await conn.run_sync(table.metadata.create_all)
    try:
        yield table.name
    finally:
        async with lab.engine.begin() as conn:
            await conn.run_sync(table.metadata.drop_all)


# ---------------------------------------------------------------- the child process
async def write_and_read(name: str, label: str, session_tz: str | None, tag: str) -> dict[str, Any]:
    """In the child: the zones it sees, then every cell: write the value through an
    AsyncSession, read back the stored instant (epoch, on the server) and what SQLAlchemy
    returns."""
    settings = {"TimeZone": session_tz} if session_tz else {}
    db = open_database(poolclass=NullPool, application_name=tag, server_settings=settings)
    cells: dict[str, dict[str, Any]] = {}
    try:
        async with db.engine.connect() as conn:
            zone = str(await conn.scalar(text("SHOW TimeZone")))
        plain, recipe = stamps(name), stamps(name, recipe=True)
        for kind, column in COLUMNS.items():
            for value_name, value in VALUES.items():
                key = f"{label}: {kind} <- {value_name}"
                cells[f"{kind} <- {value_name}"] = await cell(db, plain, column, key, value)
        for value_name, value in VALUES.items():
            key = f"{label}: {RECIPE} <- {value_name}"
            cells[f"{RECIPE} <- {value_name}"] = await cell(db, recipe, "ts", key, value)
    finally:
        await db.dispose()
    local = VALUES["naive"].astimezone().utcoffset()
    return {
        "TZ": os.environ.get("TZ"),
        "local offset": offset_text(local),
        "TimeZone": zone,
        "cells": cells,
    }


async def cell(
    db: Database, table: Table, column: str, key: str, value: datetime
) -> dict[str, Any]:
    """One write and what it left: refused (the error), or stored and returned."""
    try:
        async with db.sessions.begin() as session:
            await session.execute(insert(table).values(key=key, **{column: value}))
    except StatementError as exc:  # DBAPIError (asyncpg's DataError) or the recipe's TypeError
        return {
            "written": describe(exc),
            "stored, as UTC": None,
            "shift (h)": None,
            "returned": None,
            "returned tzinfo": None,
        }
    async with db.sessions() as session:
        returned = await session.scalar(select(table.c[column]).where(table.c.key == key))
        epoch = await session.scalar(
            text(f"SELECT extract(epoch FROM {column}) FROM {table.name} WHERE key = :key"),
            {"key": key},
        )
    stored = datetime.fromtimestamp(float(epoch), UTC)
    return {
        "written": "ok",
        "stored, as UTC": stored_text(stored),
        "shift (h)": hours(stored - INTENDED),
        "returned": returned.isoformat() if isinstance(returned, datetime) else repr(returned),
        "returned tzinfo": tz_label(returned.tzinfo) if isinstance(returned, datetime) else None,
    }


def offset_text(delta: timedelta | None) -> str:
    if delta is None:
        return "none"
    sign = "-" if delta < timedelta(0) else "+"
    minutes = int(abs(delta).total_seconds()) // 60
    return f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"


async def session_zone(tag: str) -> dict[str, str]:
    """In the child: the session TimeZone a plain engine gets, and where it came from."""
    db = open_database(poolclass=NullPool, application_name=tag)
    try:
        async with db.engine.connect() as conn:
            row = (
                await conn.execute(
                    text("SELECT setting, source FROM pg_settings WHERE name = 'TimeZone'")
                )
            ).one()
    finally:
        await db.dispose()
    return {"TimeZone": str(row.setting), "source": str(row.source)}


@dataclass(frozen=True)
class Observed:
    """What one child reported."""

    tz: str | None
    local_offset: str
    session: str
    cells: dict[str, dict[str, Any]]
    seconds: float


async def in_child(lab: Lab[Sizes], label: str, *, tz: str, session_tz: str) -> Observed:
    name = await lab.use(scratch_table)
    done = await child.call(
        lab,
        write_and_read,
        name,
        label,
        session_tz,
        lab.tag,
        within=lab.sizes.child_timeout,
        env={"TZ": tz, "PGTZ": None},
    )
    if not done.finished:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the child failed ({done.ended()}): {done.error or tail}")
    found = done.value
    return Observed(
        found["TZ"], found["local offset"], found["TimeZone"], found["cells"], done.seconds
    )


@asynccontextmanager
async def mismatched(lab: Lab[Sizes]) -> AsyncIterator[Observed]:
    """One child with TZ = child_tz whose engine asks for TimeZone = session_tz."""
    yield await in_child(lab, "mismatched", tz=lab.sizes.child_tz, session_tz=lab.sizes.session_tz)


# ---------------------------------------------------------------- the scenarios
@run.scenario
async def the_zones_differ(lab: Lab[Sizes]) -> None:
    """A child process with TZ set to child_tz, whose engine passes TimeZone = session_tz
    as a connect option, reports its local UTC offset and SHOW TimeZone."""
    seen = await lab.use(mismatched)
    lab.figure("child process, mismatched zones", seen.seconds, "s")
    lab.check(
        "the child's local time and the session's TimeZone differ",
        "The child's TZ makes Python's local time that zone (its offset at the instant, "
        "from the system's zone database), and the engine's connect option sets the "
        "session TimeZone on both drivers (asyncpg server_settings, psycopg options=-c): "
        "two zones, neither UTC.",
        expected={
            "child TZ": lab.sizes.child_tz,
            "child's local offset": offset_text(offset_of(lab.sizes.child_tz)),
            "session TimeZone": lab.sizes.session_tz,
        },
        observed={
            "child TZ": seen.tz,
            "child's local offset": seen.local_offset,
            "session TimeZone": seen.session,
        },
    )


@run.scenario
async def timestamp_without_time_zone(lab: Lab[Sizes]) -> None:
    """In that child: the naive, the aware UTC and the aware +05:30 value, each written to
    the DateTime() (timestamp) column in its own transaction, then read back."""
    seen = await lab.use(mismatched)
    session = lab.sizes.session_tz
    lab.check(
        "timestamp <- naive: stored as written",
        "A naive datetime in a timestamp column is stored as the same wall clock and comes "
        "back naive, on both drivers, whatever TZ and TimeZone say: right, as long as every "
        "writer and reader agrees that naive means UTC.",
        expected=written(0, VALUES["naive"]),
        observed=seen.cells["timestamp <- naive"],
    )
    for value_name in ("aware UTC", "aware +05:30"):
        lab.check(
            f"timestamp <- {value_name}: asyncpg refuses, psycopg shifts",
            f"An {value_name} datetime for a timestamp column: asyncpg refuses it before "
            "sending anything (DataError \"can't subtract offset-naive and offset-aware "
            'datetimes", wrapped in DBAPIError, asyncpg#1139). psycopg sends it as a '
            "timestamptz and the server casts it to the session TimeZone's wall clock: "
            f"{wall(session):%H:%M} ({session}) is stored and returned naive, "
            f"{hours(offset_of(session)):+g} h from the intended instant, with no error.",
            expected=on(
                asyncpg=refused(REFUSED_AWARE),
                psycopg=written(hours(offset_of(session)), wall(session)),
            ),
            observed=seen.cells[f"timestamp <- {value_name}"],
        )


@run.scenario
async def timestamp_with_time_zone(lab: Lab[Sizes]) -> None:
    """In that child: the same three values written to the DateTime(timezone=True)
    (timestamptz) column, each in its own transaction, then read back."""
    seen = await lab.use(mismatched)
    local, session = lab.sizes.child_tz, lab.sizes.session_tz
    lab.check(
        "timestamptz <- naive: taken in a local zone, silently",
        "A naive datetime for a timestamptz column is taken as local time, and which local "
        "time depends on the driver. asyncpg converts it itself with Python's astimezone(), "
        f"in the process's TZ ({local}): stored {-hours(offset_of(local)):+g} h from the "
        "intended instant, returned in UTC. psycopg sends it as a timestamp and the server "
        f"casts it in the session TimeZone ({session}): stored "
        f"{-hours(offset_of(session)):+g} h off, and returned with the same wall clock "
        "12:00 in that zone, so the round trip looks right in that session. No error on "
        "either.",
        expected=on(
            asyncpg=written(-hours(offset_of(local)), taken_in(local).astimezone(UTC)),
            psycopg=written(-hours(offset_of(session)), taken_in(session)),
        ),
        observed=seen.cells["timestamptz <- naive"],
    )
    for value_name in ("aware UTC", "aware +05:30"):
        lab.check(
            f"timestamptz <- {value_name}: the intended instant",
            f"An {value_name} datetime for a timestamptz column stores the intended instant "
            "on both drivers, whatever TZ and TimeZone are; the offset written is not kept. "
            "asyncpg returns it in UTC (datetime.timezone.utc) whatever the session's "
            f"TimeZone (asyncpg#1006); psycopg returns it in the session TimeZone ({session}, "
            "a ZoneInfo): the same instant, another wall clock.",
            expected=on(
                asyncpg=written(0, INTENDED),
                psycopg=written(0, INTENDED.astimezone(ZoneInfo(session))),
            ),
            observed=seen.cells[f"timestamptz <- {value_name}"],
        )


@run.scenario
async def utc_everywhere(lab: Lab[Sizes]) -> None:
    """A second child with TZ=UTC whose engine asks for TimeZone=UTC writes the same three
    values to both columns."""
    seen = await in_child(lab, "utc", tz="UTC", session_tz="UTC")
    lab.figure("child process, UTC everywhere", seen.seconds, "s")
    lab.check(
        "fix: timestamptz with UTC everywhere",
        "With DateTime(timezone=True) and both the process (TZ=UTC) and the session "
        "(TimeZone=UTC) in UTC, every value stores the intended instant on both drivers, the "
        "naive one included (both drivers' local zone is now UTC), and both return it as "
        "datetime.timezone.utc. The aware values were right in the mismatched child as well; "
        "UTC everywhere adds that a naive value slipping in does no harm and that both "
        "drivers return the same tzinfo.",
        expected={
            "process offset, session TimeZone": ["+00:00", "UTC"],
            **brief({name: written(0, INTENDED) for name in VALUES}),
        },
        observed={
            "process offset, session TimeZone": [seen.local_offset, seen.session],
            **brief({name: seen.cells[f"timestamptz <- {name}"] for name in VALUES}),
        },
    )
    lab.check(
        "with UTC everywhere a timestamp column still differs by driver",
        "In the timestamp column with UTC everywhere psycopg's cast is harmless (the aware "
        "values are stored as their UTC wall clock), while asyncpg still refuses every aware "
        "value: the column type, not the zones, decides that.",
        expected=per_driver(
            asyncpg=brief(
                {
                    "naive": written(0, VALUES["naive"]),
                    "aware UTC": refused(REFUSED_AWARE),
                    "aware +05:30": refused(REFUSED_AWARE),
                }
            ),
            psycopg=brief({name: written(0, VALUES["naive"]) for name in VALUES}),
        ),
        observed=brief({name: seen.cells[f"timestamp <- {name}"] for name in VALUES}),
    )


@run.scenario
async def a_timestamp_column_through_tzdatetime(lab: Lab[Sizes]) -> None:
    """In the mismatched child: the three values written to the timestamp column through
    SQLAlchemy's TZDateTime recipe (a TypeDecorator) instead of DateTime()."""
    seen = await lab.use(mismatched)
    lab.check(
        "fix for a timestamp column: the TZDateTime recipe",
        "The recipe's TypeDecorator converts an aware value to naive UTC before the driver "
        "sees it and refuses a naive one (TypeError, raised by SQLAlchemy as a "
        "StatementError before anything is sent): both aware values store the intended "
        "instant and come back aware UTC, on both drivers, in the child whose zones differ.",
        expected=brief(
            {
                "naive": refused(matches(r"^StatementError\(TypeError\): .*tzinfo is required")),
                "aware UTC": written(0, INTENDED),
                "aware +05:30": written(0, INTENDED),
            }
        ),
        observed=brief({name: seen.cells[f"{RECIPE} <- {name}"] for name in VALUES}),
    )


@run.scenario
async def pgtz_environment_variable(lab: Lab[Sizes]) -> None:
    """A child with no PGTZ, then one with PGTZ set to a zone other than the server's default
    (child_tz, or session_tz if that is the default), both with TZ=UTC and no TimeZone
    connect option: each reports the session TimeZone and pg_settings' source for it."""

    async def zone_in_child(pgtz: str | None) -> dict[str, str]:
        done = await child.call(
            lab,
            session_zone,
            lab.tag,
            within=lab.sizes.child_timeout,
            env={"PGTZ": pgtz, "TZ": "UTC"},
        )
        if not done.finished:
            return {"error": f"the child failed ({done.ended()}): {done.error}"}
        return {str(k): str(v) for k, v in done.value.items()}

    default = await zone_in_child(None)
    sizes = lab.sizes
    zone = sizes.child_tz if default.get("TimeZone") != sizes.child_tz else sizes.session_tz
    found = await zone_in_child(zone)
    lab.note(
        f"Without PGTZ the session TimeZone is {default.get('TimeZone')} (source: "
        f"{default.get('source')}): the server's default, which initdb takes from the "
        "environment it runs in; PGTZ was set to "
        f"{zone}."
    )
    lab.check(
        "PGTZ sets the session TimeZone with psycopg only",
        "libpq reads PGTZ (not TZ, which is UTC in this child) and sends it as the session's "
        "TimeZone at connect time, so with psycopg the session runs in that zone (pg_settings "
        "source 'client'). asyncpg does not read PGTZ (asyncpg#985): its session keeps the "
        "server's default, the same as in a child without PGTZ. An application that sets "
        "PGTZ gets different casts, and so different stored instants for the silent cells "
        "above, depending on the driver.",
        expected={
            "without PGTZ: source": not_("client"),
            "with PGTZ: TimeZone": on(asyncpg=default.get("TimeZone"), psycopg=zone),
            "with PGTZ: source": on(asyncpg=not_("client"), psycopg="client"),
        },
        observed={
            "without PGTZ: source": default.get("source"),
            "with PGTZ: TimeZone": found.get("TimeZone"),
            "with PGTZ: source": found.get("source"),
        },
    )
