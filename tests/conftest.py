"""Fixtures shared by the whole suite.

One database for the run: with ``DATABASE_URL`` unset, a throw-away embedded
PostgreSQL in a temporary directory (``oat-pg-*``), stopped and removed at the end of
the run whichever way it ends (:func:`orm_async_tests.embedded.ensure_server`); with it set, that
server. Either way the run works in its own fresh schema (``DB_SCHEMA``),
migrated to head at the start and dropped at the end, so the suite never
touches the data of ``public`` and can run twice in a row or beside another run.

The engine lives on the session-scoped event loop (``loop_scope="session"``
in pyproject's pytest settings) and is disposed at the end. ``session`` gives
each test an ``AsyncSession`` inside a transaction that is rolled back
afterwards (``join_transaction_mode="create_savepoint"``: the test's own
commits become savepoints).
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.pool import NullPool

from orm_async_tests import migrations
from orm_async_tests.db import Database, Target, open_database, resolve_target
from orm_async_tests.embedded import discard
from orm_async_tests.settings import ASYNC_DRIVERS, Settings, with_driver


@pytest.fixture(scope="session")
def test_env() -> Iterator[dict[str, str]]:
    """The environment of this run; also exported, so subprocesses use the same database."""
    env: dict[str, str] = {"DB_SCHEMA": f"oat_test_{secrets.token_hex(4)}"}
    if not os.environ.get("DATABASE_URL"):
        env["EMBEDDED_PGDATA"] = str(Path(tempfile.mkdtemp(prefix="oat-pg-")) / "pgdata")
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        yield env


@pytest.fixture(scope="session")
def settings(test_env: dict[str, str]) -> Settings:
    return Settings.from_env()


@pytest.fixture(scope="session")
def target(settings: Settings) -> Iterator[Target]:
    """The run's server. An embedded one is stopped and its directory removed at the end
    of the run; if the run is killed instead, the watcher started with it does that."""
    found = resolve_target(settings, throwaway_embedded=True)
    yield found
    if found.embedded is not None:
        discard(found.embedded.data_dir)


@pytest.fixture(scope="session")
async def database(settings: Settings, target: Target) -> AsyncIterator[Database]:
    db = open_database(settings, target=target)
    assert settings.schema is not None
    try:
        await migrations.create_schema(db.engine, settings.schema)
        await migrations.upgrade(db.engine)
        yield db
    finally:
        await db.dispose()  # first: no pooled connection may hold a lock on the schema
        async with open_database(settings, target=target, poolclass=NullPool) as cleanup:
            await migrations.drop_schema(cleanup.engine, settings.schema)


@pytest.fixture(scope="session")
async def databases(
    database: Database, settings: Settings, target: Target
) -> AsyncIterator[dict[str, Database]]:
    """The run's database through each async driver (the migrated schema is shared)."""
    found = {settings.driver: database}
    others = [d for d in ASYNC_DRIVERS if d != settings.driver]
    for driver in others:
        found[driver] = open_database(
            dataclasses.replace(settings, driver=driver),
            target=Target(with_driver(target.url, driver), target.embedded),
        )
    try:
        yield found
    finally:
        for driver in others:
            await found[driver].dispose()


@pytest.fixture(scope="session")
def engine(database: Database) -> AsyncEngine:
    return database.engine


@pytest.fixture
async def session(engine: AsyncEngine) -> AsyncIterator[AsyncSession]:
    """An AsyncSession whose work is rolled back after the test, commits included."""
    async with engine.connect() as conn:
        outer = await conn.begin()
        async with AsyncSession(
            bind=conn, join_transaction_mode="create_savepoint", expire_on_commit=False
        ) as session:
            yield session
        await outer.rollback()
