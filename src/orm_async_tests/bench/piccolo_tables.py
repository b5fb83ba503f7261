"""Piccolo ORM tables of the SAME tables as :mod:`orm_async_tests.models`, and their engine.

``tablename=`` names the tables the Alembic migrations create, and every column
is mapped with the type the migrations gave it. Piccolo never creates or alters
anything here: the benchmark never calls ``create_table`` or runs Piccolo
migrations, and there is no ``piccolo_conf.py``.

**The engine.** Piccolo binds a table to an engine when the class is defined
(``class User(Table, db=ENGINE)``; without ``db=`` it imports ``piccolo_conf``
on first use), and the columns ask that engine its type (``postgres``) to choose
their SQL and defaults. But ``Engine.__init__`` also connects at once, with a
synchronous ``run_sync`` (``asyncio.run``, or a thread when a loop is running),
to check the server's version (and to create ``extensions``), so a
``PostgresEngine`` made at import would connect to nothing yet known and warn
("Unable to fetch server version"). :class:`BenchEngine` is a ``PostgresEngine``
with no server until :meth:`BenchEngine.start` sets its ``config`` (the asyncpg
keyword arguments of :mod:`.connect`), runs Piccolo's own version check against
that server, and starts its asyncpg pool; :meth:`BenchEngine.stop` closes it.

**Defaults** are Python-side, Piccolo's way (``TimestamptzNow``, ``UUID4``,
``list``, ``"{}"``): an INSERT sends every column but the primary key (``DEFAULT``),
with the same values as the server's defaults (the client's clock instead of the
transaction's). ``updated_at`` has ``auto_update``, so every ``Table.update()``
and ``save()`` of an existing row sets it, like the model's ``onupdate``.

**Types.** ``status`` is the PostgreSQL enum ``user_status``: Piccolo has no
enum column, so it is a ``Varchar`` with ``choices=UserStatus`` (values sent
and read as text; asyncpg's codec for an enum is text). ``profile`` is
``JSONB``: Piccolo returns its text unless the query says
``.output(load_json=True)``. ``track_points.user_id`` is a ``ForeignKey`` named
``user_id``, its column's name, so a row's ``user_id`` is the user's id.
"""

from __future__ import annotations

from typing import Any

from piccolo.columns import (
    JSONB,
    UUID,
    Array,
    BigSerial,
    DoublePrecision,
    ForeignKey,
    Integer,
    Timestamptz,
    Varchar,
)
from piccolo.columns.defaults.timestamptz import TimestamptzNow
from piccolo.engine.postgres import PostgresEngine
from piccolo.table import Table

from ..models import UserStatus


class BenchEngine(PostgresEngine):
    """A ``PostgresEngine`` that connects nowhere until :meth:`start`."""

    def __init__(self) -> None:
        super().__init__(config={}, extensions=())

    async def check_version(self) -> None:
        """Piccolo's version check, once there is a server to ask (not at construction)."""
        if self.config:
            await super().check_version()  # type: ignore[no-untyped-call]  # (Piccolo: no hints)

    async def start(self, config: dict[str, Any], pool_size: int) -> None:
        """Connect to the server of ``config`` (asyncpg's keyword arguments): check its
        version, then open a pool of ``pool_size`` connections."""
        self.config = config
        await self.check_version()
        await self.start_connection_pool(min_size=pool_size, max_size=pool_size)

    async def stop(self) -> None:
        """Close the pool (if it was started) and forget the server."""
        if self.pool is not None:
            await self.close_connection_pool()
        self.config = {}


ENGINE = BenchEngine()


class User(Table, tablename="users", db=ENGINE):
    id = BigSerial(primary_key=True)
    username = Varchar(length=64, unique=True)
    status = Varchar(length=16, default=UserStatus.active.value, choices=UserStatus)
    profile = JSONB(default="{}")
    login_count = Integer(default=0)
    public_id = UUID(unique=True)
    tags = Array(base_column=Varchar(length=32), default=list)
    created_at = Timestamptz(default=TimestamptzNow())
    updated_at = Timestamptz(default=TimestamptzNow(), auto_update=TimestamptzNow().python)


class TrackPoint(Table, tablename="track_points", db=ENGINE):
    id = BigSerial(primary_key=True)
    user_id = ForeignKey(references=User)
    lat = DoublePrecision()
    lon = DoublePrecision()
    date = Timestamptz()
    created_at = Timestamptz(default=TimestamptzNow())


class Group(Table, tablename="groups", db=ENGINE):
    id = BigSerial(primary_key=True)
    name = Varchar(length=64, unique=True)
