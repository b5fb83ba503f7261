"""The one place that builds the async engine and the session factory.

Everything that talks to PostgreSQL (experiments, CLI, Alembic's env.py, the
tests) gets its engine from :func:`open_database` or :func:`create_engine`, so
every option below is set once and documented here.

Engine options (from :class:`~orm_async_tests.settings.Settings`, i.e. the
environment):

``pool_size`` (``DB_POOL_SIZE``, 5)
    Connections the ``AsyncAdaptedQueuePool`` keeps open after use.
``max_overflow`` (``DB_MAX_OVERFLOW``, 10)
    Extra connections opened under load and closed on return; so at most
    ``pool_size + max_overflow`` connections per engine exist at once.
``pool_timeout`` (``DB_POOL_TIMEOUT``, 30 s)
    How long a checkout waits for a free connection once that limit is reached
    before ``sqlalchemy.exc.TimeoutError`` is raised.
``pool_pre_ping`` (``DB_PRE_PING``, on)
    Each checkout first checks the connection is alive (a cheap ping) and
    replaces it if not: one extra round trip per checkout, in exchange for
    surviving a server restart or a killed backend without an error.
``echo`` (``DB_ECHO``, off)
    Log every SQL statement (``sqlalchemy.engine`` logger).
connect timeout (``DB_CONNECT_TIMEOUT``, 5 s)
    Given to the driver, so an unreachable server fails fast instead of hanging.
``search_path`` (``DB_SCHEMA``, unset)
    Put first on every connection's search path through the driver's connect
    arguments (not a ``SET`` statement, which a pool reset would roll back).
``application_name`` (``DB_APPLICATION_NAME``, ``orm-async-tests``)
    Shown in ``pg_stat_activity``; experiments pass their own name to count
    their connections on the server.

Session factory options:

``expire_on_commit=False``
    With the default (``True``) every attribute is expired by ``commit()`` and
    the next plain attribute read must go to the database, which an
    ``AsyncSession`` cannot do implicitly: it raises ``MissingGreenlet``.
    Experiment 3 observes exactly that; async code therefore keeps objects
    loaded after commit and refreshes explicitly (``await session.refresh``).
``autoflush`` (default, ``True``)
    Pending changes are flushed before each query, as in sync SQLAlchemy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine as _create_async_engine,
)
from sqlalchemy.pool import NullPool, Pool

from .embedded import EmbeddedServer, ensure_server
from .settings import Settings, redacted, with_driver


@dataclass(frozen=True)
class Target:
    """Which server a :class:`Database` talks to, described without secrets."""

    url: URL
    embedded: EmbeddedServer | None = None

    def describe(self) -> str:
        if self.embedded is not None:
            return f"embedded PostgreSQL in {self.embedded.data_dir}"
        return redacted(self.url)


def resolve_target(settings: Settings, *, throwaway_embedded: bool = False) -> Target:
    """The server to use: ``DATABASE_URL``, or the embedded one (started if needed)."""
    if settings.database_url is not None:
        return Target(with_driver(settings.database_url, settings.driver))
    server = ensure_server(settings.embedded_data_dir, throwaway=throwaway_embedded)
    return Target(server.url(settings.driver), server)


def connect_args(
    settings: Settings,
    *,
    application_name: str | None = None,
    server_settings: Mapping[str, str] | None = None,
    driver: str | None = None,
) -> dict[str, Any]:
    """Driver-specific connect arguments for timeout, search_path, application_name
    (``settings.application_name`` unless given) and other server settings, for
    ``driver`` (the URL's; ``settings.driver`` unless given).

    ``server_settings`` (``{"lock_timeout": "5s"}``) become session defaults of every
    connection at startup (asyncpg ``server_settings``, psycopg ``options=-c``), so a
    pool reset's ROLLBACK never undoes them.
    """
    parameters = dict(server_settings or {})
    parameters["application_name"] = application_name or settings.application_name
    if settings.schema:
        parameters["search_path"] = settings.schema
    if (driver or settings.driver) == "psycopg":
        args: dict[str, Any] = {
            "connect_timeout": max(1, round(settings.connect_timeout)),
            "application_name": parameters.pop("application_name"),
        }
        if parameters:
            args["options"] = " ".join(f"-c {name}={value}" for name, value in parameters.items())
        return args
    return {"timeout": settings.connect_timeout, "server_settings": parameters}


def create_engine(
    settings: Settings,
    target: Target,
    *,
    poolclass: type[Pool] | None = None,
    application_name: str | None = None,
    server_settings: Mapping[str, str] | None = None,
    driver_args: Mapping[str, Any] | None = None,
    url_query: Mapping[str, str] | None = None,
    **overrides: Any,
) -> AsyncEngine:
    """An ``AsyncEngine`` for ``target`` with the options documented above.

    ``server_settings`` and ``driver_args`` (``{"command_timeout": 1}``) are added to
    :func:`connect_args`; ``url_query`` to the URL's query, where SQLAlchemy's dialects
    read their own options (``{"prepared_statement_cache_size": "0"}``). ``overrides``
    are passed to ``create_async_engine`` last, so an experiment can change one option
    (``pool_size=2``, ``pool_pre_ping=False``) and keep the rest.
    """
    args = connect_args(
        settings,
        application_name=application_name,
        server_settings=server_settings,
        driver=target.url.get_driver_name(),
    )
    options: dict[str, Any] = {
        "echo": settings.echo,
        "pool_pre_ping": settings.pool_pre_ping,
        "connect_args": args | dict(driver_args or {}),
    }
    if poolclass is not None:
        options["poolclass"] = poolclass
    if poolclass is not NullPool:
        options.update(
            pool_size=settings.pool_size,
            max_overflow=settings.max_overflow,
            pool_timeout=settings.pool_timeout,
        )
    options.update(overrides)
    url = target.url.update_query_dict(dict(url_query)) if url_query else target.url
    return _create_async_engine(url, **options)


def create_session_factory(bind: AsyncEngine, **overrides: Any) -> async_sessionmaker[AsyncSession]:
    """The project's session factory: see the module docstring for each option."""
    options: dict[str, Any] = {"expire_on_commit": False}
    options.update(overrides)
    return async_sessionmaker(bind, **options)


@dataclass
class Database:
    """An engine, its session factory and where it points; dispose it when done.

    ``async with open_database() as db:`` disposes the engine on exit, so no
    connection outlives the event loop that opened it.
    """

    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    settings: Settings
    target: Target
    _server_version: str | None = field(default=None, repr=False)

    async def server_version(self) -> str:
        """``SHOW server_version`` (cached): also the first real round trip."""
        if self._server_version is None:
            async with self.engine.connect() as conn:
                self._server_version = str(
                    (await conn.execute(text("SHOW server_version"))).scalar_one()
                )
        return self._server_version

    def describe(self) -> str:
        return self.target.describe()

    async def dispose(self) -> None:
        await self.engine.dispose()

    async def __aenter__(self) -> Database:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.dispose()


def open_database(
    settings: Settings | None = None,
    *,
    target: Target | None = None,
    poolclass: type[Pool] | None = None,
    application_name: str | None = None,
    session_options: Mapping[str, Any] | None = None,
    **engine_overrides: Any,
) -> Database:
    """Settings from the environment (unless given) → engine + session factory.

    Building the engine does not connect; the first query does, and that is
    where a wrong URL or a stopped server shows up (see :mod:`.errors`).
    """
    settings = settings or Settings.from_env()
    target = target or resolve_target(settings)
    engine = create_engine(
        settings,
        target,
        poolclass=poolclass,
        application_name=application_name,
        **engine_overrides,
    )
    sessions = create_session_factory(engine, **dict(session_options or {}))
    return Database(engine, sessions, settings, target)
