"""Experiment 3: server defaults, timestamps and implicit IO (the seed's third script).

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
from datetime import datetime
from typing import Any

from sqlalchemy import exc, func, inspect, select, text, update
from sqlalchemy.orm import DeclarativeBase, Mapped

from .db import create_session_factory
from .harness import Lab, experiment
from .models import User


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


def seconds_between(earlier: datetime | None, later: datetime) -> str:
    return "?" if earlier is None else f"{(later - earlier).total_seconds():.3f} s"


def attempt(read: Callable[[], Any]) -> str:
    """Read an attribute synchronously; say what came back or what was raised."""
    try:
        value = read()
    except exc.MissingGreenlet as err:
        return f"{type(err).__name__} raised"
    return f"value {value!r}"


@experiment(3, "Server defaults, timestamps and implicit IO")
async def run(lab: Lab, *, pause: float = 0.05) -> None:
    """Which server-generated values (created_at, updated_at, defaults) are loaded after
    a flush, which are expired, and what happens when async code reads an expired
    attribute — and which fixes work?"""
    # INSERT: eager_defaults="auto" fetches server defaults with RETURNING
    async with lab.sessions() as session:
        transaction_now = await session.scalar(select(func.now()))  # BEGIN happens here
        await asyncio.sleep(pause)
        user = User(username=f"{lab.tag}ada")
        session.add(user)
        with lab.statements() as sent:
            await session.flush()
        insert_clock = await session.scalar(select(func.clock_timestamp()))
        returns_created_at = "created_at" in sent[-1].partition("RETURNING")[2]
        unloaded = sorted(
            inspect(user).unloaded & {"created_at", "updated_at", "status", "profile"}
        )
        lab.check(
            "INSERT returns server defaults",
            "With the default eager_defaults='auto', the INSERT itself fetches the "
            "server-generated columns with RETURNING: they are readable right after the flush, "
            "with no extra SELECT.",
            expected="1 statement: INSERT ... RETURNING ... created_at; none unloaded",
            observed=f"{len(sent)} statement(s), RETURNING created_at: "
            f"{returns_created_at}; unloaded: {unloaded or 'none'}",
            passed=len(sent) == 1 and returns_created_at and not unloaded,
        )
        lab.check(
            "created_at is the transaction's now()",
            "server_default=now() is PostgreSQL's transaction start time, not the moment "
            "of the INSERT: with a pause between BEGIN and INSERT, created_at equals the "
            "transaction's now() and lies before the INSERT's clock_timestamp().",
            expected="created_at == now() < clock_timestamp() after the INSERT",
            observed=f"== now(): {user.created_at == transaction_now}; before the INSERT by "
            f"{seconds_between(user.created_at, insert_clock) if insert_clock else '?'}",
            passed=user.created_at == transaction_now
            and insert_clock is not None
            and user.created_at < insert_clock,
        )
        user.username = f"{lab.tag}ada-renamed"
        await session.flush()
        first_updated = await session.scalar(select(User.updated_at).where(User.id == user.id))
        created = user.created_at
        lab.check(
            "same transaction: updated_at == created_at",
            "An UPDATE in the transaction that inserted the row sets updated_at=now(), which is "
            "still the same instant: updated_at does not move within one transaction.",
            expected=str(created),
            observed=str(first_updated),
        )
        await session.commit()

    # UPDATE in a later transaction: updated_at moves, but is not returned by default
    await asyncio.sleep(pause)
    async with lab.sessions() as session:
        user = await session.get_one(User, user.id)
        user.profile = {"city": "Grenoble"}
        with lab.statements() as sent:
            await session.flush()
        expired_read = attempt(lambda: user.updated_at)
        lab.check(
            "after an UPDATE flush, updated_at is expired",
            "onupdate=now() is computed by the server, and eager_defaults='auto' does not "
            "fetch it after an UPDATE: the attribute is expired, and a plain read would need "
            "IO, which async SQLAlchemy refuses with MissingGreenlet.",
            expected="UPDATE without RETURNING; MissingGreenlet raised",
            observed=f"RETURNING in UPDATE: {'RETURNING' in sent[-1]}; {expired_read}",
            passed="RETURNING" not in sent[-1] and expired_read == "MissingGreenlet raised",
        )
        await session.refresh(user, ["updated_at"])
        await session.commit()
    lab.check(
        "updated_at changes on UPDATE (later transaction)",
        "An ORM UPDATE in a later transaction moves updated_at forward and leaves "
        "created_at alone.",
        expected="updated_at > before, created_at unchanged",
        observed=f"updated_at moved {seconds_between(first_updated, user.updated_at)}; "
        f"created_at unchanged: {user.created_at == created}",
        passed=first_updated is not None
        and user.updated_at > first_updated
        and user.created_at == created,
    )

    # eager_defaults=True: the UPDATE itself returns updated_at
    async with lab.sessions() as session:
        eager = await session.get_one(EagerUser, user.id)
        eager.username = f"{lab.tag}ada-eager"
        with lab.statements() as sent:
            await session.flush()
        read = attempt(lambda: eager.updated_at)
        await session.commit()
    lab.check(
        "eager_defaults=True returns updated_at",
        "Mapped with eager_defaults=True, the UPDATE carries RETURNING updated_at and the "
        "new value is readable right after the flush.",
        expected="UPDATE ... RETURNING updated_at; a value",
        observed=f"RETURNING in UPDATE: {'RETURNING' in sent[-1]}; {read.split(' ')[0]}",
        passed="RETURNING" in sent[-1] and read.startswith("value"),
    )

    # Core update() applies onupdate; raw SQL does not
    async with lab.sessions.begin() as session:
        before = await session.scalar(select(User.updated_at).where(User.id == user.id))
    await asyncio.sleep(pause)
    async with lab.sessions.begin() as session:
        await session.execute(
            text("UPDATE users SET login_count = login_count + 1 WHERE id = :id"), {"id": user.id}
        )
    async with lab.sessions.begin() as session:
        after_raw = await session.scalar(select(User.updated_at).where(User.id == user.id))
    async with lab.sessions.begin() as session:
        await session.execute(
            update(User).where(User.id == user.id).values(login_count=User.login_count + 1)
        )
    async with lab.sessions.begin() as session:
        after_core = await session.scalar(select(User.updated_at).where(User.id == user.id))
    lab.check(
        "raw SQL UPDATE leaves updated_at; Core update() sets it",
        "onupdate lives in SQLAlchemy, not in the database: a text() UPDATE does not touch "
        "updated_at, a Core update(User) does.",
        expected="raw: unchanged; Core: moved",
        observed=f"raw: {'unchanged' if after_raw == before else 'moved'}; "
        f"Core: {'moved' if after_core and after_raw and after_core > after_raw else 'unchanged'}",
        passed=after_raw == before
        and after_core is not None
        and after_raw is not None
        and after_core > after_raw,
    )

    await implicit_io_after_commit(lab)


async def implicit_io_after_commit(lab: Lab) -> None:
    """expire_on_commit=True, then read an attribute after commit: the error and three fixes."""
    expiring = create_session_factory(lab.engine, expire_on_commit=True)

    async with expiring() as session:
        user = User(username=f"{lab.tag}grace")
        session.add(user)
        await session.commit()
        plain = attempt(lambda: user.username)
        lab.check(
            "expire_on_commit=True: read after commit raises",
            "commit() expires every attribute; the next plain read must load it, which an "
            "AsyncSession cannot do implicitly: sqlalchemy.exc.MissingGreenlet.",
            expected="MissingGreenlet raised",
            observed=plain,
        )
        await session.refresh(user)
        lab.check(
            "fix: await session.refresh(obj)",
            "An explicit await session.refresh() after commit reloads the attributes; plain "
            "reads work again.",
            expected=f"value {f'{lab.tag}grace'!r}",
            observed=attempt(lambda: user.username),
        )
        await session.commit()
        awaited = await user.awaitable_attrs.username
        lab.check(
            "fix: await obj.awaitable_attrs.name",
            "AsyncAttrs.awaitable_attrs turns the implicit load into an awaitable: the expired "
            "attribute is loaded with IO the event loop allows.",
            expected=f"{lab.tag}grace",
            observed=awaited,
        )

    async with lab.sessions() as session:  # the project's factory: expire_on_commit=False
        user = User(username=f"{lab.tag}hopper")
        session.add(user)
        await session.commit()
        lab.check(
            "fix: expire_on_commit=False",
            "With the project's session factory (expire_on_commit=False) attributes stay "
            "loaded after commit: the read needs no IO.",
            expected=f"value {f'{lab.tag}hopper'!r}",
            observed=attempt(lambda: user.username),
        )
