"""Alembic environment: async (asyncpg or psycopg), from Alembic's ``async`` template.

Two ways in:

- the ``alembic`` command line: the database comes from the project's settings
  (``DATABASE_URL``, or the embedded PostgreSQL started on demand), through
  ``async_engine_from_config`` with a ``NullPool`` engine that is disposed at
  the end; a setup problem is reported as one line (``FAILED: ...``);
- code and tests (``orm_async_tests.migrations``): they put a sync
  ``Connection`` (from ``AsyncConnection.run_sync``) in
  ``config.attributes["connection"]`` and it is used as it is, inside their
  running event loop.
"""

import asyncio
from logging.config import fileConfig

from alembic import context
from alembic.util import CommandError
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import async_engine_from_config

from orm_async_tests.db import Target, connect_args, resolve_target
from orm_async_tests.errors import explain
from orm_async_tests.migrations import COMPARE_OPTIONS, create_schema
from orm_async_tests.models import Base
from orm_async_tests.settings import Settings

config = context.config

if config.config_file_name is not None and "connection" not in config.attributes:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def run_migrations_offline() -> None:
    """Write the SQL instead of running it (``alembic upgrade head --sql``)."""
    context.configure(
        dialect_name="postgresql",
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        **COMPARE_OPTIONS,
    )
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, **COMPARE_OPTIONS)
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations(settings: Settings, target: Target) -> None:
    section = config.get_section(config.config_ini_section, {})
    section["sqlalchemy.url"] = target.url.render_as_string(hide_password=False)
    connectable = async_engine_from_config(
        section,
        prefix="sqlalchemy.",
        poolclass=pool.NullPool,
        connect_args=connect_args(
            settings, application_name="alembic", driver=target.url.get_driver_name()
        ),
    )
    try:
        if settings.schema:
            await create_schema(connectable, settings.schema)
        async with connectable.connect() as connection:
            await connection.run_sync(do_run_migrations)
    finally:
        await connectable.dispose()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        do_run_migrations(connection)
        return
    target = None
    try:
        settings = Settings.from_env()
        target = resolve_target(settings)
        asyncio.run(run_async_migrations(settings, target))
    except Exception as exc:
        line = explain(exc, target)
        if line is None:
            raise
        raise CommandError(line) from None


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
