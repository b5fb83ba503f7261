"""Migrations: round trip, no autogenerate drift, and the alembic command line."""

from __future__ import annotations

import asyncio
import dataclasses

from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import AsyncEngine

from orm_async_tests import migrations
from orm_async_tests.db import Target, open_database
from orm_async_tests.models import Base
from orm_async_tests.settings import Settings

from .commands import run_command


async def table_names(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as conn:
        return set(await conn.run_sync(lambda sync: inspect(sync).get_table_names()))


async def test_head_matches_the_models(engine: AsyncEngine) -> None:
    assert await migrations.drift(engine) == []
    assert await table_names(engine) >= set(Base.metadata.tables)


async def test_upgrade_downgrade_upgrade_round_trip(settings: Settings, target: Target) -> None:
    """In a schema of its own, so the rest of the suite keeps its tables."""
    schema = f"{settings.schema}_mig"
    own = dataclasses.replace(settings, schema=schema)
    async with open_database(own, target=target) as db:
        await migrations.create_schema(db.engine, schema)
        try:
            await migrations.upgrade(db.engine)
            assert await table_names(db.engine) == {*Base.metadata.tables, "alembic_version"}
            async with db.engine.connect() as conn:
                assert await migrations.current_revision(conn) == migrations.head_revision()
            await migrations.downgrade(db.engine, "base")
            assert await table_names(db.engine) == {"alembic_version"}
            await migrations.upgrade(db.engine)
            assert await migrations.drift(db.engine) == []
            await migrations.ensure_migrated(db.engine)
        finally:
            await migrations.drop_schema(db.engine, schema)


async def test_alembic_command_line(test_env: dict[str, str], settings: Settings) -> None:
    """`alembic upgrade head`, `check`, `current` as a user types them (run's schema, at head)."""
    for args, needle in [
        (("upgrade", "head"), ""),
        (("check",), "No new upgrade operations detected"),
        (("current",), migrations.head_revision() or "?"),
    ]:
        ran = await asyncio.to_thread(run_command, "alembic", *args)
        assert ran.code == 0, ran.text
        assert needle in ran.text
