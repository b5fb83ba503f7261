"""Connection parameters for raw asyncpg and Tortoise, from the project's :class:`Target`.

SQLAlchemy gets its engine from :mod:`orm_async_tests.db`; the other two
implementations must reach exactly the same server, database and schema, so
their parameters are derived from the same ``Target.url`` and ``Settings``:

- host: ``url.host``, or for the embedded server (a Unix socket, no TCP) the
  socket directory in ``url.query["host"]`` — asyncpg takes a directory as host
  and connects to ``<dir>/.s.PGSQL.<port>``;
- port 5432 unless the URL says otherwise; user, password, database from the URL;
  an ``ssl`` (or ``sslmode``) query parameter is passed on as asyncpg's ``ssl``;
- ``DB_SCHEMA``, when set, as the connection's ``search_path`` (asyncpg
  ``server_settings``; Tortoise's ``schema`` credential does the same), so both
  see the tables the SQLAlchemy engine sees;
- the connect timeout of the settings and an ``application_name``.
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
