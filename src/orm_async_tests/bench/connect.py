"""Connection parameters for raw asyncpg, raw psycopg, Tortoise and Piccolo, from the
project's :class:`Target`.

SQLAlchemy gets its engine from :mod:`orm_async_tests.db`; the other
implementations must reach exactly the same server, database and schema, so
their parameters are derived from the same ``Target.url`` and ``Settings``:

- host: ``url.host``, or for the embedded server (a Unix socket, no TCP) the
  socket directory in ``url.query["host"]`` — asyncpg and libpq (psycopg) both
  take a directory as host and connect to ``<dir>/.s.PGSQL.<port>``;
- port 5432 unless the URL says otherwise; user, password, database from the URL;
  an ``ssl`` (or ``sslmode``) query parameter is passed on as asyncpg's ``ssl``
  (libpq's ``sslmode``);
- ``DB_SCHEMA``, when set, as the connection's ``search_path`` (asyncpg
  ``server_settings``, psycopg ``options=-c search_path=…``; Tortoise's
  ``schema`` credential does the same), so all see the tables the SQLAlchemy
  engine sees;
- the connect timeout of the settings and an ``application_name``.

Piccolo's ``PostgresEngine`` hands its ``config`` to asyncpg as it is, so it
takes :meth:`ServerParams.asyncpg_kwargs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..db import Target
from ..settings import Settings

DEFAULT_PORT = 5432


@dataclass(frozen=True)
class ServerParams:
    host: str | None
    port: int
    user: str | None
    password: str | None
    database: str | None
    schema: str | None
    timeout: float
    application_name: str
    ssl: str | None = None

    def server_settings(self) -> dict[str, str]:
        found = {"application_name": self.application_name}
        if self.schema:
            found["search_path"] = self.schema
        return found

    def _connection(self) -> dict[str, Any]:
        """What asyncpg and Tortoise's asyncpg backend take alike (Tortoise passes
        ``timeout`` and ``ssl`` on to ``asyncpg.create_pool``)."""
        found: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password,
            "database": self.database,
            "timeout": self.timeout,
        }
        if self.ssl:
            found["ssl"] = self.ssl
        return found

    def asyncpg_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``asyncpg.connect`` / ``asyncpg.create_pool``."""
        return {**self._connection(), "server_settings": self.server_settings()}

    def psycopg_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``psycopg.AsyncConnection.connect`` (the ``kwargs`` of a
        ``psycopg_pool`` pool): libpq's parameter names, the search path as a startup
        option (a session default, so a ROLLBACK never undoes it), as
        :func:`orm_async_tests.db.connect_args` gives SQLAlchemy's psycopg engines."""
        found: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password,
            "dbname": self.database,
            "connect_timeout": max(1, round(self.timeout)),
            "application_name": self.application_name,
        }
        if self.schema:
            found["options"] = f"-c search_path={self.schema}"
        if self.ssl:  # asyncpg's modes are libpq's; it also takes a boolean
            found["sslmode"] = {"true": "require", "false": "disable"}.get(self.ssl, self.ssl)
        return {k: v for k, v in found.items() if v is not None}

    def tortoise_credentials(self, pool_size: int) -> dict[str, Any]:
        """The ``credentials`` of a ``tortoise.backends.asyncpg`` connection."""
        return {
            **self._connection(),
            "schema": self.schema,  # Tortoise puts it on the search_path
            "application_name": self.application_name,
            "minsize": pool_size,
            "maxsize": pool_size,
        }


def server_params(target: Target, settings: Settings, application_name: str) -> ServerParams:
    url = target.url
    host = url.host or _query_value(url.query.get("host"))
    return ServerParams(
        host=host,
        port=url.port or DEFAULT_PORT,
        user=url.username,
        password=url.password if url.password is None else str(url.password),
        database=url.database,
        schema=settings.schema,
        timeout=settings.connect_timeout,
        application_name=application_name,
        ssl=_query_value(url.query.get("ssl")) or _query_value(url.query.get("sslmode")),
    )


def _query_value(value: str | tuple[str, ...] | None) -> str | None:
    if isinstance(value, tuple):
        return value[0] if value else None
    return value
