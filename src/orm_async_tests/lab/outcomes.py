"""How experiments name what happened: an error as one line, an awaitable's outcome."""

from __future__ import annotations

import re
from collections.abc import Awaitable
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ..compat import driver_exception, error_text
from ..errors import first_line as first_line, sqlstate as sqlstate


def describe(exc: BaseException) -> str:
    """``"TypeName: first line of the message"``: how experiments report an error.

    SQLAlchemy's wrapper prefix (``(sqlalchemy.dialects.postgresql.asyncpg.InterfaceError)``)
    is left out: the type name is already there. A ``StatementError`` that wraps no
    driver error names what it wraps: ``"StatementError(MissingGreenlet): ..."``.
    """
    name = type(exc).__name__
    orig = getattr(exc, "orig", None)
    if isinstance(exc, StatementError) and not isinstance(exc, DBAPIError) and orig is not None:
        name = f"{name}({type(orig).__name__})"
    return f"{name}: {error_text(_WRAPPED.sub('', first_line(exc)))}"


_WRAPPED = re.compile(r"^\([\w.]+\) ")


def driver_error(exc: BaseException) -> BaseException:
    """The driver's own exception behind SQLAlchemy's ``DBAPIError`` (asyncpg's
    ``QueryCanceledError``, say): ``exc.orig``, and what that adapter wraps; ``exc`` itself
    when it wraps nothing."""
    found = driver_exception(exc)
    return exc if found is None else found


async def outcome(awaitable: Awaitable[Any]) -> str:
    """Await it: ``"ok"``, or :func:`describe` of what it raised."""
    try:
        await awaitable
    except Exception as exc:
        return describe(exc)
    return "ok"


async def one_transaction(sessions: async_sessionmaker[AsyncSession]) -> None:
    """Begin, ``SELECT 1``, commit: whether the next user of a pool or session factory
    gets a working transaction (wrap in :func:`outcome` to record what it raised)."""
    async with sessions.begin() as session:
        await session.execute(select(1))
