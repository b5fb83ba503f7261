"""Which server-generated values (created_at, updated_at, defaults) are loaded after a
flush, which are expired, and what happens when async code reads an expired attribute —
and which fixes work?

``created_at``/``updated_at`` come from the server (``server_default=now()``),
and ``updated_at`` is set again by every ORM/Core UPDATE (``onupdate=now()``).
What the ORM does with those server-side values after a flush decides whether
reading them is free, needs an explicit refresh, or raises ``MissingGreenlet``
because an ``AsyncSession`` cannot load an expired attribute implicitly.

Sources: SQLAlchemy ORM docs, "Fetching Server-Generated Defaults"
(``eager_defaults``, default ``"auto"``: RETURNING on INSERT only); asyncio
docs, "Preventing Implicit IO when Using AsyncSession" (``expire_on_commit=False``,
``AsyncAttrs.awaitable_attrs``, ``await session.refresh``); error reference
``xd2s`` (MissingGreenlet); PostgreSQL docs: ``now()`` is the start time of the
current transaction.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import exc, func, inspect, select, text, update
from sqlalchemy.orm import DeclarativeBase, Mapped

from .lab import BadSizes, Lab, at_least, contains, describe, experiment, on
from .models import User


@dataclass(frozen=True)
class Sizes:
    pause: float = 0.05
    """Seconds between BEGIN and the INSERT, and between transactions."""

    def __post_init__(self) -> None:
        if self.pause <= 0:
            raise BadSizes(
                f"pause ({self.pause}) must be positive: it is what tells the transaction's "
                "now() from the statement's clock, and one transaction from the next"
            )


run = experiment(3, "Server defaults, timestamps and implicit IO", Sizes)


class _EagerRegistry(DeclarativeBase):
    pass


class EagerUser(_EagerRegistry):
    """The same ``users`` table, mapped with ``eager_defaults=True`` (a second registry)."""

    __table__ = User.__table__
    __mapper_args__ = {"eager_defaults": True}

    id: Mapped[int]
    username: Mapped[str]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


def attempt(read: Callable[[], Any]) -> str:
    """Read an attribute synchronously; say what came back or what was raised."""
    try:
        value = read()
    except exc.SQLAlchemyError as err:
        return f"{describe(err).partition(':')[0]} raised"
    return f"value {value!r}"


def seconds(earlier: datetime | None, later: datetime | None) -> float:
    """``later - earlier`` in seconds (``nan`` when either is missing)."""
    if earlier is None or later is None:
        return float("nan")
    return (later - earlier).total_seconds()


def returning(statement: str) -> str:
    """What a statement's RETURNING clause lists ("" without one)."""
    return statement.partition(" RETURNING ")[2]


async def committed_user(lab: Lab[Sizes], name: str) -> User:
    async with lab.sessions.begin() as session:
        user = User(username=lab.name(name))
        session.add(user)
    return user


@run.scenario
async def insert_returns_server_defaults(lab: Lab[Sizes]) -> None:
    """BEGIN, pause, INSERT a user (eager_defaults="auto"), then rename it in the same
    transaction: what the INSERT brought back, and what now() means."""
    async with lab.sessions() as session:
        transaction_now = await session.scalar(select(func.now()))  # BEGIN happens here
        await asyncio.sleep(lab.sizes.pause)
        user = User(username=lab.name("ada"))
        session.add(user)
        with lab.statements() as sent:
            await session.flush()
        insert_clock = await session.scalar(select(func.clock_timestamp()))
        unloaded = inspect(user).unloaded & {"created_at", "updated_at", "status", "profile"}
        lab.check(
            "INSERT returns server defaults",
            "With the default eager_defaults='auto', the INSERT itself fetches the "
            "server-generated columns with RETURNING: they are readable right after the flush, "
            "with no extra SELECT.",
            expected={
                "statements": 1,
                "RETURNING lists": contains("created_at"),
                "unloaded": set(),
            },
            observed={
                "statements": len(sent),
                "RETURNING lists": returning(sent[-1]),
                "unloaded": unloaded,
            },
        )
        lab.check(
            "created_at is the transaction's now()",
            "server_default=now() is PostgreSQL's transaction start time, not the moment "
            "of the INSERT: with a pause between BEGIN and INSERT, created_at equals the "
            "transaction's now() and lies before the INSERT's clock_timestamp() by at least "
            "the pause.",
            expected={
                "created_at": transaction_now,
                "seconds before the INSERT's clock": at_least(lab.sizes.pause),
            },
            observed={
                "created_at": user.created_at,
                "seconds before the INSERT's clock": seconds(user.created_at, insert_clock),
            },
        )
        user.username = lab.name("ada-renamed")
        with lab.statements() as sent:
            await session.flush()
        updated = await session.scalar(select(User.updated_at).where(User.id == user.id))
        lab.check(
            "same transaction: updated_at == created_at",
            "An UPDATE in the transaction that inserted the row sets updated_at=now(), which is "
            "still the same instant: updated_at does not move within one transaction.",
            expected={
                "the UPDATE sets": contains("updated_at=now()"),
                "updated_at": user.created_at,
            },
            observed={"the UPDATE sets": sent[-1].partition(" SET ")[2], "updated_at": updated},
        )
        await session.commit()


@run.scenario
async def update_in_a_later_transaction(lab: Lab[Sizes]) -> None:
    """Commit a user, pause, change it in a new transaction and flush: is the new
    updated_at loaded, and what does a plain read of it do?"""
    user = await committed_user(lab, "lovelace")
    await asyncio.sleep(lab.sizes.pause)
    async with lab.sessions() as session:
        user = await session.get_one(User, user.id)
        before, created = user.updated_at, user.created_at
        user.profile = {"city": "Grenoble"}
        with lab.statements() as sent:
            await session.flush()
        expired = "updated_at" in inspect(user).expired_attributes
        read = attempt(lambda: user.updated_at)
        await session.refresh(user, ["updated_at"])
        await session.commit()
    async with lab.sessions() as session:
        created_after = await session.scalar(select(User.created_at).where(User.id == user.id))
    lab.check(
        "after an UPDATE flush, updated_at is expired",
        "onupdate=now() is computed by the server, and eager_defaults='auto' does not "
        "fetch it after an UPDATE: the attribute is expired, and a plain read would need "
        "IO, which async SQLAlchemy refuses with MissingGreenlet. With psycopg on "
        "SQLAlchemy 2.1 it arrives wrapped in a StatementError: that adapter awaits while "
        "creating the cursor, inside the statement's execution, so `except MissingGreenlet` "
        "does not catch it there.",
        expected={
            "RETURNING lists": "",
            "updated_at expired": True,
            "plain read": on(
                asyncpg="MissingGreenlet raised",
                psycopg=on(
                    sa20="MissingGreenlet raised", sa21="StatementError(MissingGreenlet) raised"
                ),
            ),
        },
        observed={
            "RETURNING lists": returning(sent[-1]),
            "updated_at expired": expired,
            "plain read": read,
        },
    )
    lab.check(
        "updated_at changes on UPDATE (later transaction)",
        "An ORM UPDATE in a later transaction moves updated_at forward by at least the pause "
        "between the transactions, and leaves created_at alone.",
        expected={
            "updated_at moved (s)": at_least(lab.sizes.pause),
            "created_at in the table": created,
        },
        observed={
            "updated_at moved (s)": seconds(before, user.updated_at),
            "created_at in the table": created_after,
        },
    )


@run.scenario
async def eager_defaults_true(lab: Lab[Sizes]) -> None:
    """The same table mapped with eager_defaults=True: change a committed user and flush."""
    user = await committed_user(lab, "eager")
    await asyncio.sleep(lab.sizes.pause)
    async with lab.sessions() as session:
        eager = await session.get_one(EagerUser, user.id)
        eager.username = lab.name("eager-renamed")
        with lab.statements() as sent:
            await session.flush()
        read = attempt(lambda: eager.updated_at)
        await session.commit()
    async with lab.sessions() as session:
        stored = await session.scalar(select(User.updated_at).where(User.id == user.id))
    lab.check(
        "eager_defaults=True returns updated_at",
        "Mapped with eager_defaults=True, the UPDATE carries RETURNING updated_at and the "
        "new value is readable right after the flush: the value the table holds after the "
        "commit, later than the INSERT's.",
        expected={
            "RETURNING lists": contains("updated_at"),
            "plain read": f"value {stored!r}",
            "moved since the INSERT (s)": at_least(lab.sizes.pause),
        },
        observed={
            "RETURNING lists": returning(sent[-1]),
            "plain read": read,
            "moved since the INSERT (s)": seconds(user.updated_at, stored),
        },
    )


@run.scenario
async def onupdate_lives_in_sqlalchemy(lab: Lab[Sizes]) -> None:
    """A raw text() UPDATE, then a Core update(User), each in its own transaction after a
    pause: which one moves updated_at?"""
    column = User.__table__.c.updated_at
    user = await committed_user(lab, "core")

    async def updated_at() -> datetime | None:
        async with lab.sessions.begin() as session:
            return await session.scalar(select(User.updated_at).where(User.id == user.id))

    before = await updated_at()
    await asyncio.sleep(lab.sizes.pause)
    async with lab.sessions.begin() as session:
        await session.execute(
            text("UPDATE users SET login_count = login_count + 1 WHERE id = :id"), {"id": user.id}
        )
    after_raw = await updated_at()
    await asyncio.sleep(lab.sizes.pause)
    async with lab.sessions.begin() as session:
        await session.execute(
            update(User).where(User.id == user.id).values(login_count=User.login_count + 1)
        )
    after_core = await updated_at()
    lab.check(
        "raw SQL UPDATE leaves updated_at; Core update() sets it",
        "onupdate lives in SQLAlchemy, not in the database: the model declares it on "
        "updated_at, a text() UPDATE does not touch the column, a Core update(User) moves it.",
        expected={
            "onupdate declared": "now()",
            "raw UPDATE moved it (s)": 0.0,
            "Core update() moved it (s)": at_least(lab.sizes.pause),
        },
        observed={
            "onupdate declared": "none" if column.onupdate is None else str(column.onupdate.arg),
            "raw UPDATE moved it (s)": seconds(before, after_raw),
            "Core update() moved it (s)": seconds(after_raw, after_core),
        },
    )


@run.scenario
async def implicit_io_after_commit(lab: Lab[Sizes]) -> None:
    """expire_on_commit=True, then read an attribute after commit: the error and three
    fixes (refresh, awaitable_attrs, the project's expire_on_commit=False)."""
    expiring = lab.sessions_on(lab.engine, expire_on_commit=True)
    name = lab.name("grace")
    async with expiring() as session:
        user = User(username=name)
        session.add(user)
        await session.commit()
        expired_first = "username" in inspect(user).expired_attributes
        plain = attempt(lambda: user.username)
        await session.refresh(user)
        refreshed = attempt(lambda: user.username)
        await session.commit()
        expired_again = "username" in inspect(user).expired_attributes
        awaited = await user.awaitable_attrs.username
    lab.check(
        "expire_on_commit=True: read after commit raises",
        "commit() expires every attribute; the next plain read must load it, which an "
        "AsyncSession cannot do implicitly: sqlalchemy.exc.MissingGreenlet.",
        expected={"expired by commit": True, "plain read": "MissingGreenlet raised"},
        observed={"expired by commit": expired_first, "plain read": plain},
    )
    lab.check(
        "fix: await session.refresh(obj)",
        "An explicit await session.refresh() after commit reloads the attributes; plain "
        "reads work again.",
        expected=f"value {name!r}",
        observed=refreshed,
    )
    lab.check(
        "fix: await obj.awaitable_attrs.name",
        "AsyncAttrs.awaitable_attrs turns the implicit load into an awaitable: the attribute "
        "that the second commit expired is loaded with IO the event loop allows.",
        expected={"expired by the second commit": True, "awaited": name},
        observed={"expired by the second commit": expired_again, "awaited": awaited},
    )
    async with lab.sessions() as session:  # the project's factory: expire_on_commit=False
        user = User(username=lab.name("hopper"))
        session.add(user)
        await session.commit()
        read = attempt(lambda: user.username)
    lab.check(
        "fix: expire_on_commit=False",
        "With the project's session factory (expire_on_commit=False) attributes stay "
        "loaded after commit: the read needs no IO.",
        expected=f"value {lab.name('hopper')!r}",
        observed=read,
    )
