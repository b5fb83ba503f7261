"""Run the Alembic migrations from code, inside a running event loop.

Alembic's commands are synchronous; ``src/alembic/env.py`` accepts an existing
connection in ``config.attributes["connection"]``, so here we open an async
connection and hand its sync face to Alembic through ``run_sync``. The same
env.py serves the ``alembic`` command line, which builds its own NullPool
engine instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .db import Database
from .errors import MIGRATE_HINT, SchemaNotMigrated
from .models import Base

SRC_DIR = Path(__file__).resolve().parent.parent
SCRIPT_LOCATION = SRC_DIR / "alembic"
ALEMBIC_INI = SRC_DIR.parent / "alembic.ini"

COMPARE_OPTIONS: dict[str, Any] = {"compare_type": True, "compare_server_default": True}
"""What autogenerate compares; env.py and :func:`drift` use the same options."""


def alembic_config() -> Config:
    """The project's ``alembic.ini`` (when present) with the script location made absolute."""
    config = Config(str(ALEMBIC_INI)) if ALEMBIC_INI.exists() else Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    return config


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


async def current_revision(conn: AsyncConnection) -> str | None:
    def read(sync_conn: Connection) -> str | None:
        return MigrationContext.configure(sync_conn).get_current_revision()

    return await conn.run_sync(read)


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    await _run(engine, command.upgrade, revision)


async def downgrade(engine: AsyncEngine, revision: str = "base") -> None:
    await _run(engine, command.downgrade, revision)


async def drift(engine: AsyncEngine) -> list[Any]:
    """What autogenerate would write now: empty when models and database agree."""

    def compare(sync_conn: Connection) -> list[Any]:
        context = MigrationContext.configure(sync_conn, opts=dict(COMPARE_OPTIONS))
        return list(compare_metadata(context, Base.metadata))

    async with engine.connect() as conn:
        return await conn.run_sync(compare)


async def ensure_migrated(engine: AsyncEngine) -> None:
    """Raise :class:`SchemaNotMigrated` (with what to do) unless the database is at head."""
    head = head_revision()
    async with engine.connect() as conn:
        current = await current_revision(conn)
    if current != head:
        state = "has no migrations applied" if current is None else f"is at revision {current}"
        raise SchemaNotMigrated(f"the database {state}, the code needs {head}: {MIGRATE_HINT}")


async def prepare(db: Database) -> str | None:
    """Make ``db`` ready for the experiments, or say why it is not.

    The embedded server is ours: it is migrated to head here (the message says
    so). Any other server belongs to the user: we only check it is at head and
    raise :class:`SchemaNotMigrated` with what to run if it is not.
    """
    if db.target.embedded is None:
        await ensure_migrated(db.engine)
        return None
    if db.settings.schema:
        await create_schema(db.engine, db.settings.schema)
    head = head_revision()
    async with db.engine.connect() as conn:
        current = await current_revision(conn)
    if current == head:
        return None
    await upgrade(db.engine)
    return f"migrated the embedded database from {current or 'empty'} to {head}"


async def create_schema(engine: AsyncEngine, schema: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))


async def drop_schema(engine: AsyncEngine, schema: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(text("SET LOCAL lock_timeout = '10s'"))
        await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))


async def _run(engine: AsyncEngine, fn: Any, revision: str) -> None:
    def run(sync_conn: Connection) -> None:
        config = alembic_config()
        config.attributes["connection"] = sync_conn
        fn(config, revision)

    async with engine.begin() as conn:
        await conn.run_sync(run)
