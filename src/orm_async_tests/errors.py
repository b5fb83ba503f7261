"""Turn the ways a database setup goes wrong into one readable line.

Every entry point (``testN``, the CLI, Alembic's env.py) catches exceptions
through :func:`explain`: a malformed URL, an unreachable server, a wrong
password, an unknown database or an unmigrated schema becomes one line that
names the problem and what to do; the password never appears in it.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator

from sqlalchemy.exc import DBAPIError, TimeoutError as PoolTimeoutError

from .db import Target
from .embedded import EmbeddedServerError
from .settings import SettingsError


class SetupError(RuntimeError):
    """A command that cannot run as asked (its message is the one line printed, exit 2)."""


class SchemaNotMigrated(RuntimeError):
    """The database exists but is not at the migrations' head revision."""


START_HINT = (
    "start the server (e.g. `docker compose up -d db`), or unset DATABASE_URL "
    "to use the embedded PostgreSQL"
)
MIGRATE_HINT = "run `alembic upgrade head` (or `poetry run alembic upgrade head`)"


def explain(exc: BaseException, target: Target | None = None) -> str | None:
    """One line for a setup problem we recognise, or ``None`` for anything else."""
    line = _explain(exc, target)
    if line is None:
        return None
    password = target.url.password if target is not None else None
    if password:
        line = line.replace(str(password), "***")
    return " ".join(line.split())


def _explain(exc: BaseException, target: Target | None) -> str | None:
    where = _where(target)
    hint = START_HINT
    if target is not None and target.embedded is not None:
        log = target.embedded.data_dir / "log"
        hint = f"see the embedded server's log at {log}, or set DATABASE_URL to use another server"
    for err in linked(exc):
        if isinstance(err, SettingsError | EmbeddedServerError | SchemaNotMigrated):
            return str(err)
        state = getattr(err, "sqlstate", None) or getattr(err, "pgcode", None)
        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        if state == "28P01" or "password authentication failed" in message:
            return (
                f"authentication failed for user {_user(target)!r} at {where}: "
                "check the user and password in DATABASE_URL"
            )
        if state == "28000":
            return f"the server at {where} refused the connection: {message}"
        if state == "3D000" or ("database" in message and "does not exist" in message):
            db = target.url.database if target is not None else "?"
            return (
                f"database {db!r} does not exist at {where}: create it "
                f"(`createdb {db}`) or name another one in DATABASE_URL"
            )
        if state in ("42P01", "42704") or "UndefinedTable" in type(err).__name__:
            return f"the schema is not migrated ({message}): {MIGRATE_HINT}"
        if state in ("57P03", "53300"):
            return f"the server at {where} cannot take connections now: {message}"
        if isinstance(err, socket.gaierror):
            host = target.url.host if target is not None else "?"
            return f"cannot resolve the host {host!r} of DATABASE_URL: check its spelling"
        if (
            isinstance(err, ConnectionRefusedError)
            or "Connect call failed" in message
            or ("Connection refused" in message)
        ):
            return f"cannot reach PostgreSQL at {where} (connection refused): {hint}"
        if isinstance(err, PoolTimeoutError):
            return None  # pool exhaustion is an experiment's subject, not a setup problem
        if isinstance(err, TimeoutError) or "timeout expired" in message:
            seconds = "the connect timeout (DB_CONNECT_TIMEOUT)"
            return f"no answer from PostgreSQL at {where} within {seconds}: {hint}"
        if isinstance(err, OSError) and err.errno is not None:
            return f"cannot reach PostgreSQL at {where} ({err.strerror or message}): {hint}"
    return None


def linked(exc: BaseException, *, contexts: bool = True) -> Iterator[BaseException]:
    """The exception, what it wraps (``.orig``), its causes and (unless told otherwise)
    its contexts; each once, nearest first."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        err = todo.pop(0)
        if id(err) in seen:
            continue
        seen.add(id(err))
        yield err
        if isinstance(err, DBAPIError) and isinstance(err.orig, BaseException):
            todo.append(err.orig)
        if isinstance(err, BaseExceptionGroup):
            todo.extend(err.exceptions)
        for link in (err.__cause__, err.__context__ if contexts else None):
            if link is not None:
                todo.append(link)


def _where(target: Target | None) -> str:
    if target is None:
        return "the configured server"
    if target.embedded is not None:
        return f"the embedded PostgreSQL ({target.embedded.data_dir})"
    url = target.url
    host = url.host or url.query.get("host") or "localhost"
    return f"{host}:{url.port or 5432}/{url.database}"


def _user(target: Target | None) -> str:
    return (target.url.username or "?") if target is not None else "?"


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE the server sent with this error, or ``None`` (not a server error).

    Looked for on the exception, then on what it wraps, nearest first: a
    ``DBAPIError``'s ``.orig`` (with the asyncpg dialect, the DBAPI adapter's error,
    which copies ``sqlstate``) and ``__cause__`` (the asyncpg exception behind it). Not
    ``__context__``: an error raised while handling a server error is not that error.
    """
    for err in linked(exc, contexts=False):
        state = getattr(err, "sqlstate", None)
        if isinstance(state, str) and state:
            return state
    return None


def first_line(exc: BaseException) -> str:
    """An exception's message without SQLAlchemy's SQL echo and background link."""
    lines = str(exc).strip().splitlines()
    line = lines[0] if lines else ""
    return re.sub(r"\s*\(Background on this error at: [^)]*\)", "", line)
