"""Experiment 11: PostgreSQL types, prepared statements and LISTEN/NOTIFY through asyncpg.

Four things that look simple and are not:

- **JSONB and ARRAY are mutable Python values, but plain columns do not track
  mutation.** ``user.profile["city"] = "x"`` changes the dict in memory and
  nothing else: no UPDATE is sent. ``flag_modified()`` or a mutable wrapper
  (``MutableDict`` / ``MutableList``) tells the ORM; ``MutableDict`` only sees
  its own top-level keys, not a change inside a nested dict. Reassigning a list
  that compares equal to the (already mutated) loaded value is no change either.
- **Server-side values come back at INSERT with RETURNING** (``public_id`` from
  ``gen_random_uuid()``, ``status``, ``profile``, ``tags``), already as
  ``uuid.UUID`` (asyncpg's subclass) / ``UserStatus`` / ``dict`` / ``list``. An
  enum label PostgreSQL does not know is refused by the server, through raw SQL
  and through Core alike: the mapped ``Enum`` passes unknown strings on unless
  ``validate_strings=True``, which refuses them before anything is sent.
- **Prepared statements.** The asyncpg dialect prepares every statement and
  keeps the prepared statement per DBAPI connection (``prepared_statement_cache_size``,
  100 by default): the same SELECT run K times is prepared once.
  ``prepared_statement_cache_size=0`` does *not* turn server-side prepared
  statements off: asyncpg, whose own ``statement_cache_size`` is still on,
  gives every prepare a new name (``__asyncpg_stmt_N__``), so each execution
  prepares a new named statement and closes the previous one later. Only with
  asyncpg's ``statement_cache_size=0`` as well are the statements unnamed (and
  absent from ``pg_prepared_statements``). Observed through
  ``pg_prepared_statements`` (name, executions = ``generic_plans + custom_plans``).
- **LISTEN/NOTIFY** needs the raw asyncpg connection (``add_listener``) on a
  connection kept out of the shared pool; notifications are delivered at COMMIT,
  in order, never for a rolled-back transaction, and identical payloads within
  one transaction are folded into one.

Sources: SQLAlchemy docs, "Mutation Tracking" (``sqlalchemy.ext.mutable``:
``MutableDict`` does not apply tracking to the values inside the dictionary, so
it is no solution for deep changes to a JSON structure; ``MutableList``;
``flag_modified``); PostgreSQL dialect docs for JSONB, ARRAY (the type does not
detect in-place mutations; use ``MutableList``), UUID and ENUM, and the core
``Enum`` type (``validate_strings``, default False: only when True is an unknown
string refused with ``LookupError``); asyncpg dialect docs, "Prepared Statement
Cache" and "Prepared Statement Name with PGBouncer"; asyncpg API reference,
``Connection.add_listener`` / ``remove_listener`` and ``statement_cache_size``;
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
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.ext.mutable import MutableDict, MutableList
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.orm.attributes import flag_modified
from sqlalchemy.pool import NullPool

from .db import Target, create_engine
from .harness import Lab, describe, experiment, sqlstate
from .models import User, UserStatus


class _MutableRegistry(DeclarativeBase):
    pass


class MutableUser(_MutableRegistry):
    """The ``users`` table again, in a private registry, with mutation-tracking types."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    username: Mapped[str] = mapped_column(String(64))
    profile: Mapped[dict[str, Any]] = mapped_column(MutableDict.as_mutable(JSONB))
    tags: Mapped[list[str]] = mapped_column(MutableList.as_mutable(ARRAY(String(32))))


def updates(sent: list[str]) -> int:
    return sum(1 for statement in sent if statement.startswith("UPDATE users"))


async def stored(lab: Lab, user_id: int) -> tuple[dict[str, Any], list[str]]:
    """What the database holds, read in a fresh session."""
    async with lab.sessions() as session:
        row = (
            await session.execute(select(User.profile, User.tags).where(User.id == user_id))
        ).one()
        return row.profile, row.tags


@experiment(11, "PostgreSQL types, prepared statements and LISTEN/NOTIFY through asyncpg")
async def run(
    lab: Lab, *, executions: int = 20, notifications: int = 5, quiet: float = 0.2
) -> None:
    """Which in-place changes to JSONB and ARRAY columns are saved, and what do
    flag_modified and MutableDict/MutableList change; do UUID, enum and server defaults
    round-trip through asyncpg; is a statement executed repeatedly prepared once, and what
    does prepared_statement_cache_size=0 really change; and when do LISTEN/NOTIFY
    notifications arrive through the raw asyncpg connection?"""
    user_id = await server_defaults_uuid_enum(lab)
    await jsonb_mutation(lab, user_id)
    await array_mutation(lab, user_id)
    if lab.engine.dialect.driver != "asyncpg":
        lab.note(
            f"driver {lab.engine.dialect.driver!r}: the asyncpg parts (prepared statement "
            "cache, add_listener) were skipped"
        )
        return
    await prepared_statements(lab, executions)
    await listen_notify(lab, notifications, quiet)


# -- server defaults, UUID, enum ------------------------------------------------------


async def server_defaults_uuid_enum(lab: Lab) -> int:
    async with lab.sessions() as session:
        user = User(username=f"{lab.tag}types")
        session.add(user)
        with lab.statements() as sent:
            await session.flush()
        returning = sent[-1].partition(" RETURNING ")[2] if sent else ""
        values = (user.public_id, user.status, user.profile, user.tags)
        await session.commit()
    returned = [c for c in ("public_id", "status", "profile", "tags") if f"users.{c}" in returning]
    lab.check(
        "server defaults come back with RETURNING",
        "An INSERT naming only username fetches the server defaults (public_id from "
        "gen_random_uuid(), status, profile, tags) in the same statement with RETURNING, "
        "already converted: uuid.UUID, UserStatus.active, {} and [].",
        expected="1 statement, RETURNING public_id, status, profile, tags; "
        "UUID v4, UserStatus.active, {}, []",
        observed=f"{len(sent)} statement(s), RETURNING {', '.join(returned) or 'none'}; "
        f"{type(values[0]).__name__} v{getattr(values[0], 'version', '?')}, {values[1]}, "
        f"{values[2]!r}, {values[3]!r}",
        passed=len(sent) == 1
        and len(returned) == 4
        and isinstance(values[0], uuid.UUID)
        and values[0].version == 4
        and values[1] is UserStatus.active
        and values[2] == {}
        and values[3] == [],
    )
    public_id = user.public_id
    lab.note(
        f"public_id arrives as {type(public_id).__module__}.{type(public_id).__qualname__} "
        f"(a subclass of uuid.UUID: {isinstance(public_id, uuid.UUID)})"
    )

    async with lab.sessions() as session:
        found = await session.scalar(select(User.username).where(User.public_id == public_id))
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
        expected=f"found {user.username}; UserStatus.suspended, stored 'suspended'",
        observed=f"found {found}; {status}, stored {raw_status!r}",
        passed=found == user.username
        and status is UserStatus.suspended
        and raw_status == "suspended",
    )

    refused = await set_status(
        lab,
        text("UPDATE users SET status = :status WHERE id = :id"),
        {"status": "banned", "id": user.id},
    )
    lab.check(
        "raw SQL: PostgreSQL refuses an unknown enum label",
        "Through text(), 'banned' reaches the server, which rejects it as input for the "
        "enum type user_status (SQLSTATE 22P02 invalid_text_representation).",
        expected='1 sent; 22P02: ... invalid input value for enum user_status: "banned"',
        observed=refused.shown(),
        passed=refused.sent == 1
        and refused.sqlstate == "22P02"
        and 'invalid input value for enum user_status: "banned"' in refused.outcome,
    )

    core = await set_status(lab, update(User).where(User.id == user.id).values(status="banned"))
    lab.check(
        "Core update() with a string: sent, refused by PostgreSQL",
        "The mapped Enum(UserStatus) type has validate_strings=False (the default): a plain "
        "string that is not a member is passed through unchecked, so the statement is sent "
        "and it is PostgreSQL, not SQLAlchemy, that refuses it.",
        expected='1 sent; 22P02: ... invalid input value for enum user_status: "banned"',
        observed=core.shown(),
        passed=core.sent == 1
        and core.sqlstate == "22P02"
        and 'invalid input value for enum user_status: "banned"' in core.outcome,
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
        expected="0 sent; StatementError: ... 'banned' is not among the defined enum values",
        observed=checked.shown(),
        passed=checked.sent == 0
        and checked.outcome.startswith("StatementError")
        and "is not among the defined enum values" in checked.outcome,
    )
    return user.id


@dataclass
class Attempt:
    outcome: str
    sqlstate: str | None
    sent: int

    def shown(self) -> str:
        return f"{self.sent} sent; {self.sqlstate or '-'}: {self.outcome}"


async def set_status(
    lab: Lab, statement: Executable, params: dict[str, Any] | None = None
) -> Attempt:
    """Try a statement that writes a status; what happened and what was sent."""
    async with lab.sessions() as session:
        with lab.statements() as sent:
            try:
                await session.execute(statement, params)
                outcome, state = "accepted", None
            except StatementError as err:
                outcome, state = describe(err), sqlstate(err)
        await session.rollback()
    return Attempt(outcome, state, len(sent))


# -- JSONB ------------------------------------------------------------------------------


async def jsonb_mutation(lab: Lab, user_id: int) -> None:
    start = {"city": "Paris", "address": {"zip": "75001"}}
    async with lab.sessions.begin() as session:
        await session.execute(
            update(User).where(User.id == user_id).values(profile=start, tags=["a", "b"])
        )

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
        expected="is_modified False; 0 UPDATE; stored 'Paris', in memory 'Lyon'",
        observed=f"is_modified {modified}; {updates(sent)} UPDATE; stored "
        f"{profile.get('city')!r}, in memory {in_memory!r}",
        passed=not modified
        and updates(sent) == 0
        and profile.get("city") == "Paris"
        and in_memory == "Lyon",
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
        expected="is_modified True; 1 UPDATE; stored 'Lyon'",
        observed=f"is_modified {modified}; {updates(sent)} UPDATE; stored {profile.get('city')!r}",
        passed=modified and updates(sent) == 1 and profile.get("city") == "Lyon",
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
        expected="MutableDict; 1 UPDATE; stored 'Nice'",
        observed=f"{kind}; {updates(sent)} UPDATE; stored {profile.get('city')!r}",
        passed=kind == "MutableDict" and updates(sent) == 1 and profile.get("city") == "Nice",
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
        expected="nested dict; 0 UPDATE; stored zip '75001'",
        observed=f"nested {type(nested).__name__}; {updates(sent)} UPDATE; stored zip "
        f"{profile.get('address', {}).get('zip')!r}",
        passed=type(nested) is dict
        and updates(sent) == 0
        and profile.get("address", {}).get("zip") == "75001",
    )


# -- ARRAY -----------------------------------------------------------------------------


async def array_mutation(lab: Lab, user_id: int) -> None:
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
        expected="list ['a', 'b']; 0 UPDATE; stored ['a', 'b']",
        observed=f"{type(loaded).__name__} {before!r}; {updates(sent)} UPDATE; stored {tags!r}",
        passed=type(loaded) is list
        and before == ["a", "b"]
        and updates(sent) == 0
        and tags == ["a", "b"],
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
        expected="0 UPDATE; stored ['a', 'b']",
        observed=f"{updates(sent)} UPDATE; stored {tags!r}",
        passed=updates(sent) == 0 and tags == ["a", "b"],
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
        expected="1 UPDATE -> ['a', 'b', 'c']; 1 UPDATE -> ['a', 'b', 'c', 'd']",
        observed=f"{updates(sent)} UPDATE -> {tags!r}; "
        f"{updates(sent_mutable)} UPDATE -> {tags_mutable!r}",
        passed=updates(sent) == 1
        and tags == ["a", "b", "c"]
        and updates(sent_mutable) == 1
        and tags_mutable == ["a", "b", "c", "d"],
    )


# -- prepared statements -------------------------------------------------------------------

PREPARED = "SELECT name, generic_plans + custom_plans FROM pg_prepared_statements "
PREPARED += "WHERE statement LIKE $1 ORDER BY prepare_time, name"


@dataclass
class Prepared:
    """What pg_prepared_statements showed for the marked statement, in one configuration."""

    label: str
    names: list[str] = field(default_factory=list)  # every name seen, in order, distinct
    visible: list[int] = field(default_factory=list)  # rows visible after each execution
    final: list[tuple[str, int]] = field(default_factory=list)  # (name, executions) at the end
    seconds: float = 0.0

    def summary(self) -> str:
        names = sorted(set(self.names))
        shown = ", ".join(n or "''" for n in names[:2]) + (", ..." if len(names) > 2 else "")
        final = ", ".join(f"{n}x{runs}" for n, runs in self.final) or "none"
        return (
            f"{len(names)} distinct name(s) [{shown}], at most {max(self.visible, default=0)} "
            f"visible at once; at the end: {final}"
        )


@asynccontextmanager
async def scratch_engine(
    lab: Lab, query: dict[str, str], **driver_args: Any
) -> AsyncIterator[AsyncEngine]:
    """An engine on another URL (query parameters changed), outside the shared pool."""
    url = lab.db.target.url.update_query_dict(query)
    engine = create_engine(
        lab.db.settings,
        Target(url),
        poolclass=NullPool,
        application_name=lab.tag,
        driver_args=driver_args,
    )
    try:
        yield engine
    finally:
        await engine.dispose()


async def observe_prepared(lab: Lab, engine: AsyncEngine, label: str, executions: int) -> Prepared:
    """Run one marked SELECT ``executions`` times on ONE connection, watching the server."""
    marker = f"{lab.tag.replace('-', '_')}probe"
    statement = select(User.id.label(marker)).where(User.username == bindparam("name"))
    seen = Prepared(label)
    async with engine.connect() as conn:
        raw = await conn.get_raw_connection()
        driver = raw.driver_connection
        assert driver is not None

        async def snapshot() -> list[tuple[str, int]]:
            # asyncpg's own statement cache serves this query after its first run, so
            # reading the view prepares nothing and does not trigger asyncpg's lazy close
            rows = await driver.fetch(PREPARED, f"%{marker}%")
            return [(str(r[0]), int(r[1])) for r in rows]

        await snapshot()
        for i in range(executions):
            started = time.perf_counter()
            await conn.execute(statement, {"name": f"{lab.tag}nobody-{i}"})
            seen.seconds += time.perf_counter() - started
            rows = await snapshot()
            seen.visible.append(len(rows))
            seen.names.extend(n for n, _ in rows if n not in seen.names)
        seen.final = await snapshot()
        await conn.rollback()
    lab.figure(f"{label}: {executions} executions", seen.seconds, "s")
    lab.figure(f"{label}: per execution", seen.seconds / executions * 1e3, "ms")
    return seen


async def prepared_statements(lab: Lab, executions: int) -> None:
    async with scratch_engine(lab, {}) as engine:
        default = await observe_prepared(lab, engine, "default cache", executions)
    names = sorted(set(default.names))
    lab.check(
        "default: prepared once, executed K times",
        f"On one connection, the same SELECT with {executions} different parameters is "
        "prepared once: pg_prepared_statements holds one named statement for it, executed "
        f"{executions} times (generic_plans + custom_plans).",
        expected=f"1 distinct name, at the end: <name>x{executions}",
        observed=default.summary(),
        passed=len(names) == 1 and names[0] != "" and default.final == [(names[0], executions)],
    )

    async with scratch_engine(lab, {"prepared_statement_cache_size": "0"}) as engine:
        uncached = await observe_prepared(
            lab, engine, "prepared_statement_cache_size=0", executions
        )
    names = sorted(set(uncached.names))
    lab.check(
        "prepared_statement_cache_size=0: a new named statement per execution",
        "Turning SQLAlchemy's cache off does not stop server-side prepared statements: each "
        "execution prepares the statement again under a new asyncpg name "
        "(__asyncpg_stmt_N__), runs it once, and asyncpg closes it lazily (when the next one is "
        "prepared), so one is visible after each execution.",
        expected=f"{executions} distinct __asyncpg_stmt_ names, at most 1 visible at once, "
        "the last executed once",
        observed=uncached.summary(),
        passed=len(names) == executions
        and all(n.startswith("__asyncpg_stmt_") for n in names)
        and len(uncached.final) == 1
        and all(runs == 1 for _, runs in uncached.final)
        and max(uncached.visible) == 1,
    )

    lab.note(
        "count(*) of pg_prepared_statements for the statement after the run: "
        f"{len(default.final)} with the default cache, {len(uncached.final)} with "
        "prepared_statement_cache_size=0 -- a count alone does not tell them apart; the names "
        "and execution counts do"
    )

    async with scratch_engine(
        lab, {"prepared_statement_cache_size": "0"}, statement_cache_size=0
    ) as engine:
        unnamed = await observe_prepared(
            lab, engine, "both caches 0 (unnamed statements)", executions
        )
    lab.check(
        "plus asyncpg statement_cache_size=0: unnamed, nothing in the view",
        "With asyncpg's own statement_cache_size=0 as well, SQLAlchemy's prepare() gets the "
        "unnamed statement, which pg_prepared_statements does not list: nothing is ever "
        "visible (the setup PgBouncer in transaction mode needs).",
        expected="0 distinct name(s), at most 0 visible at once; at the end: none",
        observed=unnamed.summary(),
        passed=not unnamed.names and not unnamed.final and max(unnamed.visible) == 0,
    )
    if default.seconds > 0:
        lab.figure(
            "cache off vs default, time per execution", uncached.seconds / default.seconds, "x"
        )
        lab.figure(
            "both off vs default, time per execution", unnamed.seconds / default.seconds, "x"
        )


# -- LISTEN/NOTIFY -------------------------------------------------------------------------

NOTIFY = text("SELECT pg_notify(:channel, :payload)")


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


async def listen_notify(lab: Lab, notifications: int, quiet: float) -> None:
    channel = f"{lab.tag.replace('-', '_')}events"
    queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()

    def on_notify(connection: Any, pid: int, channel: str, payload: str) -> None:
        queue.put_nowait((pid, payload))

    listener_engine = lab.engine_with(poolclass=NullPool)  # the listener stays out of the pool
    async with listener_engine.connect() as conn:
        raw = await conn.get_raw_connection()
        driver = raw.driver_connection
        assert driver is not None
        await driver.add_listener(channel, on_notify)
        try:
            payloads = [f"message-{i}" for i in range(notifications)]
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
        finally:
            await driver.remove_listener(channel, on_notify)

    lab.check(
        "NOTIFY: nothing arrives before COMMIT",
        "pg_notify() inside an open transaction is held until COMMIT: while it is open the "
        "listener receives a sentinel another transaction committed, and none of the "
        f"sender's payloads (also none within {quiet} s more).",
        expected=["sentinel"],
        observed=before_commit,
    )
    received = [p for _, p in after_commit] + after_commit_extra
    pids = {pid for pid, _ in after_commit}
    lab.check(
        "NOTIFY: after COMMIT every payload, in order, duplicates folded",
        "At COMMIT the listener gets each payload in the order sent, from the sender's "
        "backend pid; the payload sent twice in the same transaction arrives once.",
        expected=f"{[*payloads, 'duplicate']} from pid {sender_pid}",
        observed=f"{received} from pid {', '.join(map(str, sorted(pids)))}",
        passed=received == [*payloads, "duplicate"] and pids == {sender_pid},
    )
    lab.check(
        "NOTIFY: a rolled-back transaction notifies nobody",
        "A notification sent in a transaction that is rolled back is never delivered: the "
        "next committed notification is the first to arrive.",
        expected=["after-rollback"],
        observed=after_rollback,
    )
