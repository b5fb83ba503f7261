"""The db module on a real server: engine options, session factory, embedded default."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import NullPool

from orm_async_tests.db import Database, Target, connect_args, create_engine, open_database
from orm_async_tests.embedded import ensure_server
from orm_async_tests.settings import Settings, with_driver


async def test_engine_reaches_the_server_in_the_test_schema(database: Database) -> None:
    assert (await database.server_version())[:2].isdigit()
    async with database.engine.connect() as conn:
        schema = await conn.scalar(text("SELECT current_schema()"))
        app = await conn.scalar(text("SHOW application_name"))
    assert schema == database.settings.schema
    assert app == "orm-async-tests"


def test_engine_options_come_from_settings(engine: AsyncEngine, settings: Settings) -> None:
    pool = engine.pool
    assert pool.size() == settings.pool_size  # type: ignore[attr-defined]
    assert pool._max_overflow == settings.max_overflow  # type: ignore[attr-defined]
    assert pool._pre_ping is settings.pool_pre_ping


def test_session_factory_keeps_objects_loaded_after_commit(database: Database) -> None:
    assert database.sessions.kw["expire_on_commit"] is False


async def test_overrides_and_nullpool(settings: Settings, target: Target) -> None:
    async with open_database(settings, target=target, poolclass=NullPool, echo=False) as db:
        assert isinstance(db.engine.pool, NullPool)
        async with db.engine.connect() as conn:
            assert await conn.scalar(text("SELECT 1")) == 1


async def test_url_query_reaches_the_dialect(settings: Settings, target: Target) -> None:
    """``url_query`` is added to the URL, where a dialect reads its own options (asyncpg's
    prepared_statement_cache_size); the rest of the URL is kept."""
    asyncpg = Target(with_driver(target.url, "asyncpg"), target.embedded)
    engine = create_engine(settings, asyncpg, url_query={"prepared_statement_cache_size": "0"})
    try:
        assert engine.url.query["prepared_statement_cache_size"] == "0"
        assert engine.url.set(query={}) == asyncpg.url.set(query={})
        async with engine.connect() as conn:
            assert await conn.scalar(text("SELECT 1")) == 1
    finally:
        await engine.dispose()


def test_connect_args_per_driver() -> None:
    settings = Settings.from_env({"DB_SCHEMA": "s1", "DB_CONNECT_TIMEOUT": "3"})
    assert connect_args(settings) == {
        "timeout": 3.0,
        "server_settings": {"application_name": "orm-async-tests", "search_path": "s1"},
    }
    psycopg = Settings.from_env({"DB_SCHEMA": "s1", "DB_DRIVER": "psycopg"})
    assert connect_args(psycopg, application_name="x") == {
        "connect_timeout": 5,
        "application_name": "x",
        "options": "-c search_path=s1",
    }
    timeouts = {"lock_timeout": "5s"}
    assert connect_args(settings, server_settings=timeouts)["server_settings"] == {
        "lock_timeout": "5s",
        "application_name": "orm-async-tests",
        "search_path": "s1",
    }
    assert connect_args(psycopg, server_settings=timeouts)["options"] == (
        "-c lock_timeout=5s -c search_path=s1"
    )


async def test_embedded_server_is_reused_not_restarted(target: Target, database: Database) -> None:
    """Another process asking for the same data directory (``poetry run test1`` beside
    ``alembic``) finds the running server: same socket, same postmaster start time, and
    the server outlives that process."""
    if target.embedded is None:
        pytest.skip("DATABASE_URL is set: this run has no embedded server")
    assert ensure_server(target.embedded.data_dir, throwaway=True) is target.embedded
    assert target.url.query["host"] == str(target.embedded.socket_dir)
    assert target.describe().startswith("embedded PostgreSQL in ")
    started = text("SELECT pg_postmaster_start_time()")
    async with database.engine.connect() as conn:
        before = await conn.scalar(started)
    child = (
        "import sys; from pathlib import Path; from orm_async_tests.embedded import ensure_server;"
        "print(ensure_server(Path(sys.argv[1]), throwaway=True).socket_dir)"
    )
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", child, str(target.embedded.data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout.strip()) == (0, str(target.embedded.socket_dir))
    async with database.engine.connect() as conn:
        after = await conn.scalar(started)
    assert after == before
