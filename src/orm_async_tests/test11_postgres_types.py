"""Which in-place changes to JSONB and ARRAY columns are saved, and what do
flag_modified and MutableDict/MutableList change; do UUID, enum and server defaults
round-trip through the driver (asyncpg or psycopg); is a statement executed repeatedly
prepared once, and what do prepared_statement_cache_size=0 (asyncpg) and
prepare_threshold (psycopg) really change; and when do LISTEN/NOTIFY notifications
arrive at a listener on the raw driver connection?

Four things that look simple and are not:

- **JSONB and ARRAY are mutable Python values, but plain columns do not track
  mutation.** ``user.profile["city"] = "x"`` changes the dict in memory and
  nothing else: no UPDATE is sent. ``flag_modified()`` or a mutable wrapper
  (``MutableDict`` / ``MutableList``) tells the ORM; ``MutableDict`` only sees
  its own top-level keys, not a change inside a nested dict. Reassigning a list
  that compares equal to the (already mutated) loaded value is no change either.
- **Server-side values come back at INSERT with RETURNING** (``public_id`` from
  ``gen_random_uuid()``, ``status``, ``profile``, ``tags``), already as
  ``uuid.UUID`` (asyncpg returns its own subclass, psycopg a plain ``uuid.UUID``) /
  ``UserStatus`` / ``dict`` / ``list``. An enum label PostgreSQL does not know is
  refused by the server, through raw SQL and through Core alike: the mapped ``Enum``
  passes unknown strings on unless ``validate_strings=True``, which refuses them
  before anything is sent.
- **Prepared statements differ by driver.** The asyncpg dialect prepares every
  statement and keeps the prepared statement per DBAPI connection
  (``prepared_statement_cache_size``, 100 by default): the same SELECT run K times
  is prepared once, at its first execution. ``prepared_statement_cache_size=0`` does
  *not* turn server-side prepared statements off: asyncpg, whose own
  ``statement_cache_size`` is still on, gives every prepare a new name
  (``__asyncpg_stmt_N__``), so each execution prepares a new named statement and
  closes the previous one later. Only with asyncpg's ``statement_cache_size=0`` as
  well are the statements unnamed (and absent from ``pg_prepared_statements``).
  SQLAlchemy's psycopg dialect keeps no cache of its own (neither setting exists
  there); psycopg 3 itself counts executions per query text and parameter types and
  prepares a query (``_pg3_N``) once it has run ``prepare_threshold`` times (5 by
  default) on the connection: the first 5 executions are unprepared, the 6th
  prepares it. ``prepare_threshold=0`` prepares at the first execution,
  ``prepare_threshold=None`` never. And psycopg forgets them at every ROLLBACK (its
  ``rollback()`` sends ``DEALLOCATE ALL`` after it), which SQLAlchemy's pool also
  calls when a connection returns inside a transaction; asyncpg's survive. Observed
  through ``pg_prepared_statements`` (name, executions = ``generic_plans +
  custom_plans``). The settings are given here as connect arguments of a ``NullPool``
  engine (``driver_args``), which is where the URL query parameter ends up as well.
- **LISTEN/NOTIFY** needs the raw driver connection, kept out of the shared pool:
  asyncpg's ``add_listener`` (a callback, called whenever a notification arrives), or
  psycopg's ``LISTEN`` on an autocommit ``AsyncConnection`` read with ``notifies()``
  (notifications are only read while that generator runs, and a LISTEN inside an open
  transaction would only start at its COMMIT). Either way notifications are delivered
  at COMMIT, in order, never for a rolled-back transaction, and identical payloads
  within one transaction are folded into one.

Sources: SQLAlchemy docs, "Mutation Tracking" (``sqlalchemy.ext.mutable``:
``MutableDict`` does not apply tracking to the values inside the dictionary, so
it is no solution for deep changes to a JSON structure; ``MutableList``;
``flag_modified``); PostgreSQL dialect docs for JSONB, ARRAY (the type does not
detect in-place mutations; use ``MutableList``), UUID and ENUM, and the core
``Enum`` type (``validate_strings``, default False: only when True is an unknown
string refused with ``LookupError``); asyncpg dialect docs, "Prepared Statement
Cache" and "Prepared Statement Name with PGBouncer"; asyncpg API reference,
``Connection.add_listener`` / ``remove_listener`` and ``statement_cache_size``;
psycopg 3 docs, "Prepared statements" (a query is prepared after it is executed more
than ``prepare_threshold`` times, default 5; ``None`` disables it; ``prepare=False`` on
one ``execute()``) and "Asynchronous notifications" (``AsyncConnection.notifies()``,
``timeout`` and ``stop_after`` since 3.2; keep the connection in autocommit to receive
notifications in a timely manner); psycopg's source, ``psycopg/_preparing.py`` (the
``_pg3_N`` names; the whole cache is cleared, ``DEALLOCATE ALL``, after a ROLLBACK) and
``Connection.rollback()``;
PostgreSQL docs, NOTIFY (delivered only when the transaction commits, never for
a rolled-back one; in the order sent within a transaction; identical payloads on
one channel within one transaction are delivered once) and the
``pg_prepared_statements`` view. Issue threads: sqlalchemy/sqlalchemy#6467
("Using statement_cache_size asyncpg setting": ``prepared_statement_cache_size=0``
alone still leaves named prepared statements, what PgBouncer users trip on),
MagicStack/asyncpg#1058 ("asyncpg uses prepared statements despite they're
disabled"), sqlalchemy/sqlalchemy#11001 (an equal value assigned after an
in-place change is no net change: expected behavior), sqlalchemy/sqlalchemy#5218
(nested JSON changes not saved), encode/databases#368 (LISTEN/NOTIFY through the
raw asyncpg connection).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import BigInteger, Enum, Executable, String, bindparam, select, text, update
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.exc import StatementError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.ext.mutable import MutableDict, MutableList
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.orm.attributes import flag_modified

from .lab import (
    BadSizes,
    Lab,
    contains,
    describe,
    each,
    experiment,
    matches,
    not_here,
    on,
    prefix,
    sqlstate,
)
from .models import User, UserStatus

PSYCOPG_THRESHOLD = 5
"""psycopg's default ``prepare_threshold``: executions of a query before it is prepared."""


@dataclass(frozen=True)
class Sizes:
    executions: int = 20
    """Executions of the same SELECT on one connection, per prepared-statement setup."""
    notifications: int = 5
    """Distinct payloads the sender notifies in its transaction."""
    quiet: float = 0.2
    """Seconds the listener keeps listening for anything more (before COMMIT and after)."""

    def __post_init__(self) -> None:
        if self.executions < PSYCOPG_THRESHOLD + 2:
            raise BadSizes(
                f"executions ({self.executions}) must be at least {PSYCOPG_THRESHOLD + 2}: "
                f"psycopg runs a query {PSYCOPG_THRESHOLD} times unprepared, and one "
                "prepared execution cannot tell a statement prepared once from one prepared "
                "per execution"
            )
        if self.notifications < 1:
            raise BadSizes(f"notifications ({self.notifications}) must be at least 1")
        if self.quiet <= 0:
            raise BadSizes(f"quiet ({self.quiet}) must be more than 0 seconds")


run = experiment(
    11, "PostgreSQL types, prepared statements and LISTEN/NOTIFY on asyncpg and psycopg", Sizes
)


class _MutableRegistry(DeclarativeBase):
    pass


class MutableUser(_MutableRegistry):
    """The ``users`` table again, in a private registry, with mutation-tracking types."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    username: Mapped[str] = mapped_column(String(64))
    profile: Mapped[dict[str, Any]] = mapped_column(MutableDict.as_mutable(JSONB))
    tags: Mapped[list[str]] = mapped_column(MutableList.as_mutable(ARRAY(String(32))))


SERVER_DEFAULTS = ("public_id", "status", "profile", "tags")
BANNED = 'invalid input value for enum user_status: "banned"'


def updates(sent: list[str]) -> int:
    """How many of the statements sent are an UPDATE of ``users``."""
    return sum(1 for statement in sent if statement.startswith("UPDATE users"))


def returning(statement: str) -> str:
    """What a statement's RETURNING clause lists ("" without one)."""
    return statement.partition(" RETURNING ")[2]


async def stored(lab: Lab[Sizes], user_id: int) -> tuple[dict[str, Any], list[str]]:
    """What the database holds, read in a fresh session."""
    async with lab.sessions() as session:
        row = (
            await session.execute(select(User.profile, User.tags).where(User.id == user_id))
        ).one()
        return row.profile, row.tags


async def user_with(lab: Lab[Sizes], name: str, profile: dict[str, Any], tags: list[str]) -> int:
    """Commit a user of this run with that profile and those tags; its id."""
    async with lab.sessions.begin() as session:
        user = User(username=lab.name(name), profile=profile, tags=tags)
        session.add(user)
        await session.flush()
        return user.id


# -- server defaults, UUID, enum ------------------------------------------------------


@run.scenario
async def insert_returns_server_defaults(lab: Lab[Sizes]) -> None:
    """INSERT a user naming only its username: what the INSERT's RETURNING brings back,
    and as which Python types."""
    async with lab.sessions() as session:
        user = User(username=lab.name("defaults"))
        session.add(user)
        with lab.statements() as sent:
            await session.flush()
        listed = returning(sent[-1]) if sent else ""
        public_id, status, profile, tags = user.public_id, user.status, user.profile, user.tags
        await session.commit()
    lab.check(
        "server defaults come back with RETURNING",
        "An INSERT naming only username fetches the server defaults (public_id from "
        "gen_random_uuid(), status, profile, tags) in the same statement with RETURNING, "
        "already converted: uuid.UUID, UserStatus.active, {} and [].",
        expected={
            "statements": 1,
            "RETURNING lists": list(SERVER_DEFAULTS),
            "public_id is a uuid.UUID": True,
            "public_id version": 4,
            "status": UserStatus.active,
            "profile": {},
            "tags": [],
        },
        observed={
            "statements": len(sent),
            "RETURNING lists": [c for c in SERVER_DEFAULTS if f"users.{c}" in listed],
            "public_id is a uuid.UUID": isinstance(public_id, uuid.UUID),
            "public_id version": getattr(public_id, "version", None),
            "status": status,
            "profile": profile,
            "tags": tags,
        },
    )
    lab.note(
        f"public_id arrives as {type(public_id).__module__}.{type(public_id).__qualname__} "
        f"(a subclass of uuid.UUID: {isinstance(public_id, uuid.UUID)})"
    )


@dataclass(frozen=True)
class Typed:
    """A committed user of this run, as the INSERT returned it."""

    id: int
    username: str
    public_id: uuid.UUID


@asynccontextmanager
async def typed_user(lab: Lab[Sizes]) -> AsyncIterator[Typed]:
    """One user for the UUID and enum scenarios (deleted with the run's rows)."""
    async with lab.sessions.begin() as session:
        user = User(username=lab.name("types"))
        session.add(user)
        await session.flush()
        found = Typed(user.id, user.username, user.public_id)
    yield found


@run.scenario
async def uuid_and_enum_round_trip(lab: Lab[Sizes]) -> None:
    """Find a user by its uuid.UUID, set its status to an enum member through the ORM,
    and read the status back, as a member and as the stored label."""
    user = await lab.use(typed_user)
    async with lab.sessions() as session:
        found = await session.scalar(select(User.username).where(User.public_id == user.public_id))
        loaded = await session.get_one(User, user.id)
        loaded.status = UserStatus.suspended
        await session.commit()
    async with lab.sessions() as session:
        status = await session.scalar(select(User.status).where(User.id == user.id))
        raw_status = await session.scalar(
            text("SELECT status::text FROM users WHERE id = :id"), {"id": user.id}
        )
    lab.check(
        "UUID and enum round trip",
        "A uuid.UUID bound in a WHERE finds the row; an enum member written by the ORM is "
        "stored as the PostgreSQL enum label and read back as the same Python member.",
        expected={
            "found by public_id": user.username,
            "read back": UserStatus.suspended,
            "stored label": "suspended",
        },
        observed={"found by public_id": found, "read back": status, "stored label": raw_status},
    )


@dataclass
class Attempt:
    """What happened to a statement that writes a status, and how much was sent."""

    outcome: str
    sqlstate: str | None
    sent: int

    def observed(self) -> dict[str, Any]:
        return {"statements sent": self.sent, "SQLSTATE": self.sqlstate, "outcome": self.outcome}


async def set_status(
    lab: Lab[Sizes], statement: Executable, params: dict[str, Any] | None = None
) -> Attempt:
    """Try a statement that writes a status (rolled back); what happened and what was sent."""
    async with lab.sessions() as session:
        with lab.statements() as sent:
            try:
                await session.execute(statement, params)
                outcome, state = "accepted", None
            except StatementError as err:
                outcome, state = describe(err), sqlstate(err)
        await session.rollback()
    return Attempt(outcome, state, len(sent))


@run.scenario
async def unknown_enum_label(lab: Lab[Sizes]) -> None:
    """Write the status 'banned' (not a label of user_status) three ways: raw SQL, a Core
    update() with the mapped Enum, and a bind parameter typed Enum(validate_strings=True)."""
    user = await lab.use(typed_user)
    refused = await set_status(
        lab,
        text("UPDATE users SET status = :status WHERE id = :id"),
        {"status": "banned", "id": user.id},
    )
    lab.check(
        "raw SQL: PostgreSQL refuses an unknown enum label",
        "Through text(), 'banned' reaches the server, which rejects it as input for the "
        "enum type user_status (SQLSTATE 22P02 invalid_text_representation).",
        expected={"statements sent": 1, "SQLSTATE": "22P02", "outcome": contains(BANNED)},
        observed=refused.observed(),
    )

    core = await set_status(lab, update(User).where(User.id == user.id).values(status="banned"))
    lab.check(
        "Core update() with a string: sent, refused by PostgreSQL",
        "The mapped Enum(UserStatus) type has validate_strings=False (the default): a plain "
        "string that is not a member is passed through unchecked, so the statement is sent "
        "and it is PostgreSQL, not SQLAlchemy, that refuses it.",
        expected={
            "validate_strings": False,
            "statements sent": 1,
            "SQLSTATE": "22P02",
            "outcome": contains(BANNED),
        },
        observed={
            "validate_strings": getattr(User.__table__.c.status.type, "validate_strings", None),
            **core.observed(),
        },
    )

    strict = Enum(UserStatus, name="user_status", validate_strings=True)
    checked = await set_status(
        lab,
        update(User)
        .where(User.id == user.id)
        .values(status=bindparam("strict_status", type_=strict)),
        {"strict_status": "banned"},
    )
    lab.check(
        "validate_strings=True: refused before sending",
        "Bound through Enum(UserStatus, validate_strings=True), the same string fails in "
        "SQLAlchemy's bind processing (LookupError, wrapped in StatementError): nothing is "
        "sent to the server.",
        expected={
            "statements sent": 0,
            "SQLSTATE": None,
            "outcome": matches(
                r"^StatementError\(LookupError\): .*is not among the defined enum values"
            ),
        },
        observed=checked.observed(),
    )


# -- JSONB ------------------------------------------------------------------------------


@run.scenario
async def jsonb_in_place_changes(lab: Lab[Sizes]) -> None:
    """Change a user's JSONB profile in place four ways: plain, plain + flag_modified,
    MutableDict at the top level, MutableDict inside a nested dict; each in its own
    session, then read what the database kept."""
    start = {"city": "Paris", "address": {"zip": "75001"}}
    user_id = await user_with(lab, "jsonb", start, ["a", "b"])

    async with lab.sessions() as session:
        user = await session.get_one(User, user_id)
        user.profile["city"] = "Lyon"
        modified = session.is_modified(user)
        with lab.statements() as sent:
            await session.commit()
        in_memory = user.profile["city"]
    profile, _ = await stored(lab, user_id)
    lab.check(
        "plain JSONB: in-place change is not saved",
        "profile is a plain JSONB column: profile['city'] = 'Lyon' changes the dict in "
        "memory only; the session does not see it as modified, commit sends no UPDATE, and "
        "the database keeps the old value (the object in memory now disagrees with it).",
        expected={"is_modified": False, "UPDATEs": 0, "stored city": "Paris", "in memory": "Lyon"},
        observed={
            "is_modified": modified,
            "UPDATEs": updates(sent),
            "stored city": profile.get("city"),
            "in memory": in_memory,
        },
    )

    async with lab.sessions() as session:
        user = await session.get_one(User, user_id)
        user.profile["city"] = "Lyon"
        flag_modified(user, "profile")
        modified = session.is_modified(user)
        with lab.statements() as sent:
            await session.commit()
    profile, _ = await stored(lab, user_id)
    lab.check(
        "plain JSONB + flag_modified: saved",
        "flag_modified(user, 'profile') after the in-place change marks the attribute "
        "changed: commit sends an UPDATE with the whole document.",
        expected={"is_modified": True, "UPDATEs": 1, "stored city": "Lyon"},
        observed={
            "is_modified": modified,
            "UPDATEs": updates(sent),
            "stored city": profile.get("city"),
        },
    )

    async with lab.sessions() as session:
        mutable = await session.get_one(MutableUser, user_id)
        kind = type(mutable.profile).__name__
        mutable.profile["city"] = "Nice"
        with lab.statements() as sent:
            await session.commit()
    profile, _ = await stored(lab, user_id)
    lab.check(
        "MutableDict: top-level in-place change is saved",
        "Mapped with MutableDict.as_mutable(JSONB), the loaded value is a MutableDict whose "
        "__setitem__ flags the parent: the same in-place change is now an UPDATE.",
        expected={"loaded as": "MutableDict", "UPDATEs": 1, "stored city": "Nice"},
        observed={"loaded as": kind, "UPDATEs": updates(sent), "stored city": profile.get("city")},
    )

    async with lab.sessions() as session:
        mutable = await session.get_one(MutableUser, user_id)
        nested = mutable.profile["address"]
        nested["zip"] = "06000"
        with lab.statements() as sent:
            await session.commit()
    profile, _ = await stored(lab, user_id)
    lab.check(
        "MutableDict: nested in-place change is not saved",
        "MutableDict tracks its own keys only: profile['address'] is a plain dict, and "
        "changing a key inside it flags nothing: no UPDATE, the stored zip is unchanged.",
        expected={"nested value is a": "dict", "UPDATEs": 0, "stored zip": "75001"},
        observed={
            "nested value is a": type(nested).__name__,
            "UPDATEs": updates(sent),
            "stored zip": profile.get("address", {}).get("zip"),
        },
    )


# -- ARRAY -----------------------------------------------------------------------------


@run.scenario
async def array_in_place_changes(lab: Lab[Sizes]) -> None:
    """Change a user's ARRAY tags: an in-place append, an append then a reassigned copy,
    a new list, and an append on a MutableList; each in its own session."""
    user_id = await user_with(lab, "array", {}, ["a", "b"])

    async with lab.sessions() as session:
        user = await session.get_one(User, user_id)
        loaded = user.tags
        before = list(loaded)
        user.tags.append("c")
        with lab.statements() as sent:
            await session.commit()
    _, tags = await stored(lab, user_id)
    lab.check(
        "ARRAY: round trip; in-place append is not saved",
        "tags comes back as a Python list; tags.append('c') changes it in memory only: "
        "no UPDATE, the stored array keeps two elements.",
        expected={"loaded as": "list", "loaded": ["a", "b"], "UPDATEs": 0, "stored": ["a", "b"]},
        observed={
            "loaded as": type(loaded).__name__,
            "loaded": before,
            "UPDATEs": updates(sent),
            "stored": tags,
        },
    )

    async with lab.sessions() as session:
        user = await session.get_one(User, user_id)
        user.tags.append("c")
        user.tags = list(user.tags)  # a new list, equal to the mutated loaded one
        with lab.statements() as sent:
            await session.commit()
    _, tags = await stored(lab, user_id)
    lab.check(
        "ARRAY: append, then reassign a copy: still not saved",
        "The ORM remembers the loaded list object as the old value; after an in-place "
        "append it equals the new list, so the reassignment is no net change: no UPDATE.",
        expected={"UPDATEs": 0, "stored": ["a", "b"]},
        observed={"UPDATEs": updates(sent), "stored": tags},
    )

    async with lab.sessions() as session:
        user = await session.get_one(User, user_id)
        user.tags = [*user.tags, "c"]
        with lab.statements() as sent:
            await session.commit()
    _, tags = await stored(lab, user_id)
    async with lab.sessions() as session:
        mutable = await session.get_one(MutableUser, user_id)
        mutable.tags.append("d")
        with lab.statements() as sent_mutable:
            await session.commit()
    _, tags_mutable = await stored(lab, user_id)
    lab.check(
        "ARRAY: a new list, or MutableList.append, is saved",
        "Assigning a new, different list (without touching the loaded one) is an UPDATE; "
        "mapped with MutableList.as_mutable(ARRAY), an in-place append is one too.",
        expected={
            "new list: UPDATEs": 1,
            "new list: stored": ["a", "b", "c"],
            "MutableList.append: UPDATEs": 1,
            "MutableList.append: stored": ["a", "b", "c", "d"],
        },
        observed={
            "new list: UPDATEs": updates(sent),
            "new list: stored": tags,
            "MutableList.append: UPDATEs": updates(sent_mutable),
            "MutableList.append: stored": tags_mutable,
        },
    )


# -- prepared statements -------------------------------------------------------------------

PREPARED = (
    "SELECT name, generic_plans + custom_plans FROM pg_prepared_statements "
    "WHERE statement LIKE {} ORDER BY prepare_time, name"
)
ASYNCPG_NAME = "__asyncpg_stmt_"
PSYCOPG_NAME = "_pg3_"
ASYNCPG_SETTING = (
    "prepared_statement_cache_size is an argument of SQLAlchemy's asyncpg dialect and "
    "statement_cache_size one of asyncpg's connect(); SQLAlchemy's psycopg dialect keeps "
    "no prepared-statement cache, and psycopg refuses both as connect arguments (invalid "
    "connection option): psycopg's prepare_threshold decides instead (the checks below)"
)
PSYCOPG_SETTING = (
    "prepare_threshold is psycopg's connect argument; asyncpg has none (its connect() "
    "refuses it), and through SQLAlchemy's asyncpg dialect every statement is prepared at "
    "its first execution (the default check)"
)


@dataclass
class Prepared:
    """What pg_prepared_statements showed for the marked statement, in one configuration."""

    label: str
    names: list[str] = field(default_factory=list)
    """Every name seen, in order, distinct."""
    visible: list[int] = field(default_factory=list)
    """Rows visible after each execution."""
    final: list[tuple[str, int]] = field(default_factory=list)
    """(name, executions) of each row at the end."""
    after_rollback: list[tuple[str, int]] = field(default_factory=list)
    """The rows still there after the connection's ROLLBACK."""
    threshold: Any = None
    """psycopg's ``prepare_threshold`` of the connection (``None`` on asyncpg)."""
    seconds: float = 0.0

    def observed(self) -> dict[str, Any]:
        return {
            "distinct names": len(self.names),
            "names": self.names,
            "first visible after execution": next(
                (i + 1 for i, rows in enumerate(self.visible) if rows), None
            ),
            "most visible at once": max(self.visible, default=0),
            "executions of those left at the end": [runs for _, runs in self.final],
            "left after ROLLBACK": len(self.after_rollback),
        }


async def observe_prepared(lab: Lab[Sizes], engine: AsyncEngine, label: str) -> Prepared:
    """Run one marked SELECT ``executions`` times on ONE connection, watching the server,
    then roll the connection back and look once more."""
    executions = lab.sizes.executions
    marker = f"{lab.tag.replace('-', '_')}probe"
    statement = select(User.id.label(marker)).where(User.username == bindparam("name"))
    seen = Prepared(label)
    async with engine.connect() as conn:
        raw = await conn.get_raw_connection()
        driver = raw.driver_connection
        assert driver is not None
        seen.threshold = getattr(driver, "prepare_threshold", None)

        async def snapshot() -> list[tuple[str, int]]:
            if lab.cell.driver == "psycopg":
                # prepare=False: psycopg never prepares the view's own query (it would
                # after prepare_threshold runs), so reading it changes nothing
                cursor = await driver.execute(
                    PREPARED.format("%s"), (f"%{marker}%",), prepare=False
                )
                rows = await cursor.fetchall()
            else:
                # asyncpg's own statement cache serves this query after its first run, so
                # reading the view prepares nothing and does not trigger asyncpg's lazy close
                rows = await driver.fetch(PREPARED.format("$1"), f"%{marker}%")
            return [(str(r[0]), int(r[1])) for r in rows]

        await snapshot()
        for i in range(executions):
            started = time.perf_counter()
            await conn.execute(statement, {"name": lab.name(f"nobody-{i}")})
            seen.seconds += time.perf_counter() - started
            rows = await snapshot()
            seen.visible.append(len(rows))
            seen.names.extend(n for n, _ in rows if n not in seen.names)
        seen.final = await snapshot()
        await conn.rollback()
        seen.after_rollback = await snapshot()
    lab.figure(f"{label}: {executions} executions", seen.seconds, "s")
    lab.figure(f"{label}: per execution", seen.seconds / executions * 1e3, "ms")
    return seen


@run.scenario
async def prepared_statement_cache(lab: Lab[Sizes]) -> None:
    """Run the same SELECT ``executions`` times on one connection of a NullPool engine,
    reading pg_prepared_statements after each execution and after a ROLLBACK: with the
    default settings; on asyncpg with prepared_statement_cache_size=0, then with asyncpg's
    statement_cache_size=0 as well; on psycopg with prepare_threshold=0, then None."""
    executions = lab.sizes.executions
    asyncpg = lab.cell.driver == "asyncpg"
    psycopg = lab.cell.driver == "psycopg"
    default = await observe_prepared(lab, lab.unpooled(), "default cache")
    lab.check(
        "default: prepared once, executed K times",
        f"On one connection, the same SELECT with {executions} different parameters is "
        "prepared once: pg_prepared_statements ends with one named statement for it. "
        "asyncpg: SQLAlchemy's asyncpg dialect prepares it at the first execution "
        f"(__asyncpg_stmt_N__), so it counts {executions} executions (generic_plans + "
        "custom_plans), and it outlives the ROLLBACK. psycopg: the first "
        f"{PSYCOPG_THRESHOLD} executions (prepare_threshold, by default) run unprepared, "
        f"the {PSYCOPG_THRESHOLD + 1}th prepares it (_pg3_N), so it counts "
        f"{executions - PSYCOPG_THRESHOLD}; and psycopg's rollback() forgets every prepared "
        "statement (DEALLOCATE ALL), so nothing is left after it -- the same rollback() "
        "SQLAlchemy's pool calls on a connection returned inside a transaction.",
        expected=on(
            asyncpg={
                "distinct names": 1,
                "names": each(prefix(ASYNCPG_NAME)),
                "first visible after execution": 1,
                "most visible at once": 1,
                "executions of those left at the end": [executions],
                "left after ROLLBACK": 1,
            },
            psycopg={
                "distinct names": 1,
                "names": each(prefix(PSYCOPG_NAME)),
                "first visible after execution": PSYCOPG_THRESHOLD + 1,
                "most visible at once": 1,
                "executions of those left at the end": [executions - PSYCOPG_THRESHOLD],
                "left after ROLLBACK": 0,
            },
        ),
        observed=default.observed(),
    )
    lab.note(f"statements visible after each execution, default cache: {default.visible}")

    uncached = (
        await observe_prepared(
            lab,
            lab.unpooled(driver_args={"prepared_statement_cache_size": 0}),
            "prepared_statement_cache_size=0",
        )
        if asyncpg
        else None
    )
    lab.check(
        "prepared_statement_cache_size=0: a new named statement per execution",
        "Turning SQLAlchemy's cache off does not stop server-side prepared statements: each "
        "execution prepares the statement again under a new asyncpg name "
        "(__asyncpg_stmt_N__), runs it once, and asyncpg closes it lazily (when the next one is "
        "prepared), so one is visible after each execution, and the last one is still there "
        "after the ROLLBACK.",
        expected=on(
            asyncpg={
                "distinct names": executions,
                "names": each(prefix(ASYNCPG_NAME)),
                "first visible after execution": 1,
                "most visible at once": 1,
                "executions of those left at the end": [1],
                "left after ROLLBACK": 1,
            },
            psycopg=not_here(ASYNCPG_SETTING),
        ),
        observed=uncached.observed() if uncached else None,
    )
    if uncached:
        lab.note(
            "count(*) of pg_prepared_statements for the statement after the run: "
            f"{len(default.final)} with the default cache, {len(uncached.final)} with "
            "prepared_statement_cache_size=0 -- a count alone does not tell them apart; the "
            "names and execution counts do"
        )

    unnamed = (
        await observe_prepared(
            lab,
            lab.unpooled(
                driver_args={"prepared_statement_cache_size": 0, "statement_cache_size": 0}
            ),
            "both caches 0 (unnamed statements)",
        )
        if asyncpg
        else None
    )
    lab.check(
        "plus asyncpg statement_cache_size=0: unnamed, nothing in the view",
        "With asyncpg's own statement_cache_size=0 as well, SQLAlchemy's prepare() gets the "
        "unnamed statement, which pg_prepared_statements does not list: nothing is ever "
        "visible (the setup PgBouncer in transaction mode needs).",
        expected=on(
            asyncpg={
                "distinct names": 0,
                "names": [],
                "first visible after execution": None,
                "most visible at once": 0,
                "executions of those left at the end": [],
                "left after ROLLBACK": 0,
            },
            psycopg=not_here(ASYNCPG_SETTING),
        ),
        observed=unnamed.observed() if unnamed else None,
    )

    eager = (
        await observe_prepared(
            lab, lab.unpooled(driver_args={"prepare_threshold": 0}), "prepare_threshold=0"
        )
        if psycopg
        else None
    )
    lab.check(
        "psycopg prepare_threshold=0: prepared at the first execution",
        "With prepare_threshold=0 (a connect argument) psycopg prepares the SELECT at its "
        f"first execution, as asyncpg does by default: one _pg3_N statement, executed "
        f"{executions} times, gone after the ROLLBACK.",
        expected=on(
            asyncpg=not_here(PSYCOPG_SETTING),
            psycopg={
                "connection's prepare_threshold": 0,
                "distinct names": 1,
                "names": each(prefix(PSYCOPG_NAME)),
                "first visible after execution": 1,
                "most visible at once": 1,
                "executions of those left at the end": [executions],
                "left after ROLLBACK": 0,
            },
        ),
        observed={"connection's prepare_threshold": eager.threshold, **eager.observed()}
        if eager
        else None,
    )

    never = (
        await observe_prepared(
            lab, lab.unpooled(driver_args={"prepare_threshold": None}), "prepare_threshold=None"
        )
        if psycopg
        else None
    )
    lab.check(
        "psycopg prepare_threshold=None: nothing prepared",
        "With prepare_threshold=None psycopg never prepares: the SELECT runs "
        f"{executions} times through the unnamed statement and pg_prepared_statements "
        "never lists it (psycopg's setting for PgBouncer in transaction mode).",
        expected=on(
            asyncpg=not_here(PSYCOPG_SETTING),
            psycopg={
                "connection's prepare_threshold": None,
                "distinct names": 0,
                "names": [],
                "first visible after execution": None,
                "most visible at once": 0,
                "executions of those left at the end": [],
                "left after ROLLBACK": 0,
            },
        ),
        observed={"connection's prepare_threshold": never.threshold, **never.observed()}
        if never
        else None,
    )
    if default.seconds > 0:
        for other, label in [
            (uncached, "cache off vs default"),
            (unnamed, "both off vs default"),
            (eager, "prepare_threshold=0 vs default"),
            (never, "prepare_threshold=None vs default"),
        ]:
            if other:
                lab.figure(f"{label}, time per execution", other.seconds / default.seconds, "x")


# -- LISTEN/NOTIFY -------------------------------------------------------------------------

NOTIFY = text("SELECT pg_notify(:channel, :payload)")
POLL = 0.05
"""Seconds each psycopg ``notifies()`` call waits before the feeder looks whether to stop."""


@asynccontextmanager
async def listening(
    lab: Lab[Sizes], conn: AsyncConnection, channel: str, queue: asyncio.Queue[tuple[int, str]]
) -> AsyncIterator[None]:
    """Inside the block, every notification on ``channel`` reaching ``conn``'s raw
    driver connection is put on ``queue`` as ``(sender's backend pid, payload)``.

    asyncpg: ``add_listener`` (asyncpg calls back whenever one arrives). psycopg: ``LISTEN``
    on the AsyncConnection in autocommit, read by a task looping on ``notifies()``.
    """
    if lab.cell.driver == "psycopg":
        # psycopg opens a transaction for any statement unless in autocommit: a LISTEN in
        # it would start only at its COMMIT, and the server delivers nothing to a session
        # inside a transaction
        await conn.execution_options(isolation_level="AUTOCOMMIT")
    raw = await conn.get_raw_connection()
    driver = raw.driver_connection
    assert driver is not None
    if lab.cell.driver != "psycopg":

        def on_notify(connection: Any, pid: int, channel: str, payload: str) -> None:
            queue.put_nowait((pid, payload))

        await driver.add_listener(channel, on_notify)
        try:
            yield
        finally:
            await driver.remove_listener(channel, on_notify)
        return

    stop = asyncio.Event()

    async def feed() -> None:
        # notifies() reads from the socket only while it runs, holding the connection's
        # lock: a task keeps it running; its timeout lets the loop see ``stop``
        while not stop.is_set():
            async for notify in driver.notifies(timeout=POLL):
                queue.put_nowait((notify.pid, notify.payload))

    await driver.execute(f'LISTEN "{channel}"')
    feeder = asyncio.create_task(feed())
    try:
        yield
    finally:
        stop.set()
        await feeder
        await driver.execute(f'UNLISTEN "{channel}"')


async def drain(queue: asyncio.Queue[tuple[int, str]], seconds: float) -> list[str]:
    """Everything that arrives within ``seconds`` (bounded)."""
    got: list[str] = []
    deadline = time.perf_counter() + seconds
    while (left := deadline - time.perf_counter()) > 0:
        try:
            got.append((await asyncio.wait_for(queue.get(), left))[1])
        except TimeoutError:
            break
    return got


async def until(
    queue: asyncio.Queue[tuple[int, str]], last: str, seconds: float = 5.0
) -> list[tuple[int, str]]:
    """Everything up to and including the payload ``last`` (bounded: gives up after seconds)."""
    got: list[tuple[int, str]] = []
    try:
        async with asyncio.timeout(seconds):
            while not got or got[-1][1] != last:
                got.append(await queue.get())
    except TimeoutError:
        got.append((0, "<timeout>"))
    return got


@run.scenario
async def listen_notify(lab: Lab[Sizes]) -> None:
    """A listener on the raw driver connection of a NullPool engine (asyncpg's
    add_listener; psycopg's LISTEN in autocommit, read with notifies()) while a sender
    notifies ``notifications`` payloads and one duplicate in an open transaction and
    another session commits a sentinel; then the sender commits; then a rolled-back
    notification and a committed one."""
    quiet = lab.sizes.quiet
    channel = f"{lab.tag.replace('-', '_')}events"
    queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()

    payloads = [f"message-{i}" for i in range(lab.sizes.notifications)]
    # the listener's connection stays out of the pool
    async with lab.unpooled().connect() as conn, listening(lab, conn, channel, queue):
        async with lab.sessions() as sender, lab.sessions() as other:
            sender_pid = await sender.scalar(text("SELECT pg_backend_pid()"))
            for payload in [*payloads, "duplicate", "duplicate"]:
                await sender.execute(NOTIFY, {"channel": channel, "payload": payload})
            # another transaction commits a sentinel while the sender's is still open
            await other.execute(NOTIFY, {"channel": channel, "payload": "sentinel"})
            await other.commit()
            before_commit = [p for _, p in await until(queue, "sentinel")]
            before_commit += await drain(queue, quiet)
            committed = time.perf_counter()
            await sender.commit()
            after_commit = await until(queue, "duplicate")
            lab.figure("COMMIT to last notification", time.perf_counter() - committed, "s")
            after_commit_extra = await drain(queue, quiet)

        async with lab.sessions() as session:
            await session.execute(NOTIFY, {"channel": channel, "payload": "rolled-back"})
            await session.rollback()
        async with lab.sessions.begin() as session:
            await session.execute(NOTIFY, {"channel": channel, "payload": "after-rollback"})
        after_rollback = [p for _, p in await until(queue, "after-rollback")]

    lab.check(
        "NOTIFY: nothing arrives before COMMIT",
        "pg_notify() inside an open transaction is held until COMMIT: while it is open the "
        "listener receives a sentinel another transaction committed, and none of the "
        f"sender's payloads (also none within {quiet} s more).",
        expected=["sentinel"],
        observed=before_commit,
    )
    lab.check(
        "NOTIFY: after COMMIT every payload, in order, duplicates folded",
        "At COMMIT the listener gets each payload in the order sent, from the sender's "
        "backend pid; the payload sent twice in the same transaction arrives once.",
        expected={"payloads": [*payloads, "duplicate"], "from backend pids": [sender_pid]},
        observed={
            "payloads": [p for _, p in after_commit] + after_commit_extra,
            "from backend pids": sorted({pid for pid, _ in after_commit}),
        },
    )
    lab.check(
        "NOTIFY: a rolled-back transaction notifies nobody",
        "A notification sent in a transaction that is rolled back is never delivered: the "
        "next committed notification is the first to arrive.",
        expected=["after-rollback"],
        observed=after_rollback,
    )
