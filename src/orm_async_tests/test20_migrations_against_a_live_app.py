"""Can an async application run its Alembic migrations itself, from inside its running
event loop (a FastAPI lifespan calling ``command.upgrade(cfg, "head")``), while a second
replica starts and runs the same upgrade, and while the application's sessions keep
reading the table a migration alters?

Everything runs on scratch Alembic script directories the experiment writes into a temp
dir: an ``env.py`` that is Alembic's ``async`` template (``run_migrations_online()`` calls
``asyncio.run(run_async_migrations())``) plus the cookbook's connection sharing (a
connection in ``config.attributes["connection"]`` is used as it is), and two tiny
revisions on a tag-prefixed scratch table in the run's schema (REV1 creates it, REV2
adds a column; a ``pg_sleep`` makes one of them slow where two runs must overlap). Each
script directory has its own version table; tables, version tables and the temp dir are
removed at the end, and the project's own migrations and tables are never touched (its
``env.py`` is only run through ``command.current``, which does not write).

1. From a coroutine: ``command.upgrade`` with the template's ``env.py``; with ``env.py``
   using ``create_task`` instead of ``asyncio.run`` (the workaround tried in the issues);
   with the cookbook's connection sharing (``async with engine.begin() as conn: await
   conn.run_sync(run_upgrade)``), and the project's ``src/alembic/env.py`` through the same
   door; with ``await asyncio.to_thread(command.upgrade, cfg, "head")``. A 10 ms ticker
   task runs during the working ones.
2. Two child processes, started once, run ``upgrade head`` as the command line does, at
   the same moment (each waits at a start line for the other), three times: on an empty
   scratch database, on one already at REV1 (the next release deployed by two replicas),
   and on an empty one again with ``env.py`` taking a session-level ``pg_advisory_lock``.
3. A session reads the scratch table and stays idle in transaction (ACCESS SHARE);
   the migration REV1 -> REV2 (``ALTER TABLE ... ADD COLUMN``, ACCESS EXCLUSIVE) starts;
   once it waits, ``readers`` sessions read the table, each bounded, and
   ``pg_blocking_pids`` says who waits for whom. Then the same with ``SET LOCAL
   lock_timeout`` in the migration's transaction and a retry loop.

Observed (the same on asyncpg and psycopg, SQLAlchemy 2.0 and 2.1, except where said):
the template's ``env.py`` called from the loop raises ``RuntimeError: asyncio.run() cannot
be called from a running event loop`` before connecting, and the coroutine it built is
reported "never awaited" when collected. ``create_task`` is worse: ``command.upgrade``
returns without error and nothing is migrated; the task fails later with
``AttributeError: 'NoneType' object has no attribute 'configure'`` (Alembic's context is
gone by then). Connection sharing works from the loop, on the caller's connection and
transaction, and the loop keeps running other tasks meanwhile (about 30 ticks of 10 ms
during a 0.3 s migration, longest gap ~13 ms); the project's ``env.py`` supports it.
``to_thread`` works too (the template's ``asyncio.run`` gets a loop of its own in the
worker thread). Two upgrades at once without a lock: exactly one fails, on an empty
database with ``IntegrityError`` 23505 (duplicate key in ``pg_type_typname_nsp_index``:
both created the version table), on a live one with ``ProgrammingError`` 42701 (column
already exists: both ran REV2); the database ends at head either way. With the advisory
lock both succeed and the second runs no revision. Behind the idle transaction the ALTER
waits (blocked by the idle session) and every reader queues behind the ALTER (blocked by
the migration, not by the idle session): the readers waited ~1.19 s, the idle session's
whole remaining time. With ``lock_timeout = '100ms'`` the ALTER fails after ~0.11 s with
SQLSTATE 55P03, the readers waited ~0.1 s at most, and the retry after the idle session
ended succeeded (about 7 attempts). The error class differs: asyncpg's
``LockNotAvailableError`` comes out as a bare ``DBAPIError``, psycopg's
``LockNotAvailable`` as ``OperationalError`` - retry on the SQLSTATE.

Sources: Alembic docs, Cookbook, "Using Asyncio with Alembic" and "Programmatic API use
(connection sharing) With Asyncio" (``env.py`` uses a connection given in
``config.attributes``; ``await conn.run_sync(run_upgrade, cfg)``): confirmed, and the
project's ``env.py`` follows it; Alembic's ``async`` template ``env.py`` (``asyncio.run`` in
``run_migrations_online``): confirmed it cannot be called from a running loop;
``EnvironmentContext.configure`` (``version_table``, ``version_table_schema``);
``MigrationContext.begin_transaction`` (no transaction of its own inside the caller's).
Issues, as observed: sqlalchemy/alembic#1353 (open; "can't run migrations in async mode
if loop already exists", create_task fails at ``context.configure``): confirmed, and
the task's failure is silent for ``command.upgrade``; alembic#1606 (closed; a FastAPI
lifespan calling ``command.upgrade``, ``env.py`` changed to run in the current loop,
``context`` is ``None`` in ``do_run_migrations``): reproduced, the cause being that the
coroutine runs after the command has returned; alembic#1514 (``coroutine
'run_async_migrations' was never awaited``): confirmed, it accompanies the RuntimeError;
alembic#1721 (named in the brief): not found in the issue index searched, so not
assessed; alembic#633 (concurrent upgrades: no built-in guard, configure one in
``env.py``) and Flask-Migrate#311 (``UniqueViolation`` on ``pg_type``, key
``alembic_version``): confirmed; alembic discussion #870 (use ``run_sync`` with an async
driver): confirmed. PostgreSQL docs, "Explicit Locking" (13.3: ``SELECT`` takes ACCESS
SHARE, ``ALTER TABLE ... ADD COLUMN`` ACCESS EXCLUSIVE, which conflicts with every mode;
advisory locks, session level, held until released or the session ends), "Client
Connection Defaults" (``lock_timeout``: a statement that waits longer for a lock is
aborted) and "System Information Functions" (``pg_blocking_pids``: a waiter ahead in the
queue with a conflicting request "soft-blocks"): all confirmed; the readers' soft block
behind the pending ALTER is what alphagov/notifications-api#3901 describes (confirmed).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from . import migrations
from .lab import (
    BadSizes,
    Lab,
    at_least,
    at_most,
    child,
    contains,
    describe,
    each,
    experiment,
    less_than,
    matches,
    on,
    prefix,
    sqlstate,
)
from .lab.capture import captured
from .lab.probes import checked_out, poll

REV1 = "e20_create"
"""The first scratch revision: creates the scratch table."""
REV2 = "e20_add_note"
"""The second: adds a column to it (an ALTER TABLE, ACCESS EXCLUSIVE)."""
RUNNING_UPGRADE = "Running upgrade"
"""How Alembic's migration logger announces each revision it starts."""
BOUND = 30.0
"""Upper bound (s) of an in-process upgrade: a hang becomes a failed check."""


@dataclass(frozen=True)
class Sizes:
    slow_revision: float = 0.3
    """Seconds of pg_sleep in the slow revision (so two upgrades overlap, and the event
    loop has something to do meanwhile)."""
    idle_for: float = 1.2
    """Seconds the idle-in-transaction session holds its ACCESS SHARE lock on the table."""
    readers: int = 4
    """Sessions that read the table after the ALTER TABLE has queued."""
    lock_timeout_ms: int = 100
    """The migration's lock_timeout in the fixed variant, in milliseconds."""
    retry_pause: float = 0.1
    """Seconds between two attempts of the migration that gave up on its lock."""
    child_timeout: float = 60.0
    """Seconds each child process running `upgrade head` may take before it is killed."""

    def __post_init__(self) -> None:
        if not 0.1 <= self.slow_revision <= 5:
            raise BadSizes("slow_revision must be 0.1 to 5 s: long enough to overlap, short")
        if not 0.5 <= self.idle_for <= 10:
            raise BadSizes("idle_for must be 0.5 to 10 s")
        if not 1 <= self.readers <= 20:
            raise BadSizes("readers must be 1 to 20")
        if not 10 <= self.lock_timeout_ms <= self.idle_for * 1000 / 4:
            raise BadSizes(
                "lock_timeout_ms must be at least 10 and at most a quarter of idle_for, or the "
                "fixed migration cannot be told from the one that waits"
            )
        if not 0 < self.retry_pause <= self.idle_for / 2:
            raise BadSizes("retry_pause must be above 0 and at most half of idle_for")
        if self.child_timeout <= 2 * self.slow_revision:
            raise BadSizes("child_timeout must be well above slow_revision")


run = experiment(20, "Migrations against a live application", Sizes)


# ---------------------------------------------------------------- the scratch scripts
ENV_PY = '''\
"""Alembic's async template env.py, with the cookbook's connection sharing
("Programmatic API use (connection sharing) With Asyncio"); when the config says so, a
session-level pg_advisory_lock around the migration, or create_task instead of
asyncio.run."""

import asyncio

from alembic import context
from sqlalchemy import pool, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import async_engine_from_config

config = context.config
target_metadata = None
VERSION_TABLE = config.get_main_option("version_table")
SCHEMA = config.get_main_option("version_table_schema") or None
LOCK = config.get_main_option("advisory_lock")


def do_run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        version_table_schema=SCHEMA,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    connectable = async_engine_from_config(
        config.get_section(config.config_ini_section, {}),
        prefix="sqlalchemy.",
        poolclass=pool.NullPool,
    )
    async with connectable.connect() as connection:
        if LOCK:
            # session-level: it outlives this commit, and the connection's close ends it
            await connection.execute(text("SET LOCAL lock_timeout = '20s'"))
            await connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": int(LOCK)})
            await connection.commit()
        await connection.run_sync(do_run_migrations)
    await connectable.dispose()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        do_run_migrations(connection)
    elif config.get_main_option("in_running_loop") == "create_task":
        # what alembic#1353 and #1606 tried: schedule it on the running loop instead
        task = asyncio.get_running_loop().create_task(run_async_migrations())
        config.attributes["task"] = task
    else:
        asyncio.run(run_async_migrations())


run_migrations_online()
'''

REVISION = '''\
"""{doc}"""

import sqlalchemy as sa
from alembic import op

revision = {revision!r}
down_revision = {down!r}
branch_labels = None
depends_on = None


def upgrade() -> None:
{sleep}    {upgrade}


def downgrade() -> None:
    {downgrade}
'''


@dataclass(frozen=True)
class Scripts:
    """One scratch script directory: env.py and two revisions on one scratch table."""

    location: Path
    schema: str | None
    table: str
    version_table: str

    @property
    def qualified(self) -> str:
        return qualify(self.schema, self.table)

    def config(self, url: str, *, lock: int | None = None, create_task: bool = False) -> Config:
        """An Alembic Config for these scripts, built in code (no ini file, so no password
        on disk)."""
        cfg = Config()
        cfg.set_main_option("script_location", str(self.location))
        cfg.set_main_option("path_separator", "os")
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
        cfg.set_main_option("version_table", self.version_table)
        if self.schema:
            cfg.set_main_option("version_table_schema", self.schema)
        if lock is not None:
            cfg.set_main_option("advisory_lock", str(lock))
        if create_task:
            cfg.set_main_option("in_running_loop", "create_task")
        return cfg


def qualify(schema: str | None, name: str) -> str:
    return f'"{schema}"."{name}"' if schema else f'"{name}"'


def write_scripts(
    root: Path,
    name: str,
    *,
    schema: str | None,
    table: str,
    version_table: str,
    slow: dict[str, float],
) -> Scripts:
    """Write env.py and the two revisions (REV1 creates ``table``, REV2 adds a column);
    ``slow`` gives the seconds of pg_sleep at the start of a revision's upgrade."""
    location = root / name
    (location / "versions").mkdir(parents=True)
    (location / "env.py").write_text(ENV_PY)

    def sleep(revision: str) -> str:
        seconds = slow.get(revision)
        return f'    op.execute("SELECT pg_sleep({seconds})")\n' if seconds else ""

    revisions = {
        REV1: (
            None,
            "create the scratch table",
            f"op.create_table({table!r}, sa.Column('id', sa.Integer, primary_key=True), "
            f"schema={schema!r})",
            f"op.drop_table({table!r}, schema={schema!r})",
        ),
        REV2: (
            REV1,
            "add a column to it",
            f"op.add_column({table!r}, sa.Column('note', sa.Text), schema={schema!r})",
            f"op.drop_column({table!r}, 'note', schema={schema!r})",
        ),
    }
    for revision, (down, doc, upgrade, downgrade) in revisions.items():
        (location / "versions" / f"{revision}.py").write_text(
            REVISION.format(
                doc=doc,
                revision=revision,
                down=down,
                sleep=sleep(revision),
                upgrade=upgrade,
                downgrade=downgrade,
            )
        )
    return Scripts(location, schema, table, version_table)


@dataclass
class Scratch:
    """The run's temp dir and every scratch script directory written in it."""

    root: Path
    schema: str | None
    prefix: str
    made: list[Scripts] = field(default_factory=list)

    def scripts(self, name: str, *, slow: dict[str, float] | None = None) -> Scripts:
        found = write_scripts(
            self.root,
            name,
            schema=self.schema,
            table=f"{self.prefix}{name}",
            version_table=f"{self.prefix}{name}_ver",
            slow=slow or {},
        )
        self.made.append(found)
        return found


@asynccontextmanager
async def scratch(lab: Lab[Sizes]) -> AsyncIterator[Scratch]:
    """A temp dir for the scratch script directories; at the end, their tables and
    version tables are dropped and the dir removed."""
    root = Path(tempfile.mkdtemp(prefix=f"{lab.tag}alembic-"))
    found = Scratch(root, lab.db.settings.schema, lab.tag.replace("-", "_"))
    try:
        yield found
    finally:
        try:
            async with lab.engine.begin() as conn:
                await conn.execute(text("SET LOCAL lock_timeout = '10s'"))
                for made in found.made:
                    for name in (made.table, made.version_table):
                        await conn.execute(
                            text(f"DROP TABLE IF EXISTS {qualify(made.schema, name)}")
                        )
        finally:
            shutil.rmtree(root, ignore_errors=True)


def url_of(lab: Lab[Sizes]) -> str:
    return lab.db.target.url.render_as_string(hide_password=False)


def lock_key(tag: str) -> int:
    """The run's advisory lock key (a positive bigint from its tag)."""
    return int.from_bytes(hashlib.blake2b(tag.encode(), digest_size=7).digest(), "big")


# ---------------------------------------------------------------- what the database holds
async def state(engine: AsyncEngine, scripts: Scripts) -> dict[str, Any]:
    """The version table's rows and the scratch table's columns (``None``: no such table)."""
    async with engine.connect() as conn:
        version = qualify(scripts.schema, scripts.version_table)
        has_version = await conn.scalar(text("SELECT to_regclass(:n) IS NOT NULL"), {"n": version})
        rows = (
            sorted(await conn.scalars(text(f"SELECT version_num FROM {version}")))
            if has_version
            else None
        )
        columns = list(
            await conn.scalars(
                text(
                    "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(:n) "
                    "AND attnum > 0 AND NOT attisdropped ORDER BY attnum"
                ),
                {"n": scripts.qualified},
            )
        )
    return {"version rows": rows, "table columns": columns or None}


AT_HEAD = {"version rows": [REV2], "table columns": ["id", "note"]}
UNTOUCHED = {"version rows": None, "table columns": None}


# ---------------------------------------------------------------- ways to run an upgrade
async def upgrade_shared(
    engine: AsyncEngine,
    cfg: Config,
    revision: str = "head",
    *,
    downgrade: bool = False,
    lock_timeout_ms: int | None = None,
) -> None:
    """The cookbook's connection sharing: the sync face of an AsyncConnection in
    ``cfg.attributes["connection"]``, ``command.upgrade`` run through ``run_sync``."""

    def run(sync_conn: Connection) -> None:
        cfg.attributes["connection"] = sync_conn
        try:
            (command.downgrade if downgrade else command.upgrade)(cfg, revision)
        finally:
            cfg.attributes.pop("connection", None)

    async with engine.begin() as conn:
        if lock_timeout_ms is not None:
            await conn.execute(text(f"SET LOCAL lock_timeout = '{int(lock_timeout_ms)}ms'"))
        await conn.run_sync(run)


class Ticker:
    """A task that ticks every ``every`` seconds: how much the event loop served others."""

    def __init__(self, every: float = 0.01) -> None:
        self.ticks = 0
        self.longest_gap = 0.0
        self._every = every
        self._task = asyncio.create_task(self._tick())

    async def _tick(self) -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(self._every)
            now = time.perf_counter()
            self.ticks += 1
            self.longest_gap = max(self.longest_gap, now - last)
            last = now

    async def stop(self) -> None:
        self._task.cancel()
        with suppress(asyncio.CancelledError):
            await self._task


async def while_ticking(work: Awaitable[None]) -> tuple[str, Ticker, float]:
    """Await ``work`` with a :class:`Ticker` running: its outcome, the ticker, the seconds."""
    ticker = Ticker()
    started = time.perf_counter()
    try:
        async with asyncio.timeout(BOUND):
            await work
        outcome = "ok"
    except Exception as exc:
        outcome = describe(exc)
    finally:
        await ticker.stop()
    return outcome, ticker, time.perf_counter() - started


# ---------------------------------------------------------------- scenario 1: in the loop
@run.scenario
async def template_env_inside_a_running_loop(lab: Lab[Sizes]) -> None:
    """command.upgrade(cfg, "head") called straight from a coroutine, as a FastAPI lifespan
    would, with a scratch env.py whose run_migrations_online() is the async template's
    asyncio.run(run_async_migrations()) (no connection in cfg.attributes)."""
    box = await lab.use(scratch)
    scripts = box.scripts("inloop")
    cfg = scripts.config(url_of(lab))
    with captured("alembic", logging.WARNING) as got:
        try:
            command.upgrade(cfg, "head")
            raised = "no error"
        except Exception as exc:
            raised = describe(exc)
    lab.check(
        "the template's env.py inside a running loop: RuntimeError",
        "command.upgrade is synchronous; it runs env.py, whose run_migrations_online() calls "
        "asyncio.run(), and asyncio.run() refuses to start a loop in a thread whose loop is "
        "running (alembic#1353, #1606's starting point).",
        expected=matches(
            r"^RuntimeError: asyncio\.run\(\) cannot be called from a running event loop"
        ),
        observed=raised,
    )
    lab.check(
        "and the coroutine it built is never awaited",
        "run_async_migrations() was called to build the coroutine handed to asyncio.run(), "
        "which raised before running it: Python warns when that coroutine is collected "
        "(captured here, so it does not leak into later code).",
        expected=contains("RuntimeWarning: coroutine 'run_async_migrations' was never awaited"),
        observed="; ".join(got.warning_lines()),
    )
    lab.check(
        "nothing reached the database",
        "The error comes before any connection: no version table, no scratch table.",
        expected=UNTOUCHED,
        observed=await state(lab.engine, scripts),
    )


@run.scenario
async def create_task_instead_of_asyncio_run(lab: Lab[Sizes]) -> None:
    """The same call with env.py scheduling run_async_migrations() on the running loop
    (asyncio.get_running_loop().create_task) instead of asyncio.run, the workaround tried
    in alembic#1353 and #1606; then the task is awaited (bounded)."""
    box = await lab.use(scratch)
    scripts = box.scripts("task")
    cfg = scripts.config(url_of(lab), create_task=True)
    try:
        command.upgrade(cfg, "head")
        returned = "returned"
    except Exception as exc:
        returned = describe(exc)
    right_after = await state(lab.engine, scripts)
    task = cfg.attributes.pop("task", None)
    if isinstance(task, asyncio.Task):
        try:
            async with asyncio.timeout(BOUND):
                await task
            ended = "ok"
        except Exception as exc:
            ended = describe(exc)
    else:
        ended = f"no task ({type(task).__name__})"
    lab.check(
        "create_task: command.upgrade returns, and nothing is migrated",
        "command.upgrade returns at once without an error; the task only starts once the "
        "caller yields to the loop, when Alembic has already torn down the context env.py "
        "talks to (alembic.context proxies an EnvironmentContext that exists only during "
        "the command): context.configure raises AttributeError on None, in the task, where "
        "nobody awaits it unless the code keeps the task. The database is untouched.",
        expected={
            "command.upgrade": "returned",
            "right after": UNTOUCHED,
            "the task": matches(r"^AttributeError: 'NoneType' object has no attribute 'configure'"),
            "after the task": UNTOUCHED,
        },
        observed={
            "command.upgrade": returned,
            "right after": right_after,
            "the task": ended,
            "after the task": await state(lab.engine, scripts),
        },
    )


@run.scenario
async def connection_sharing_with_run_sync(lab: Lab[Sizes]) -> None:
    """The cookbook's connection sharing from the same coroutine: async with engine.begin()
    as conn: await conn.run_sync(run_upgrade), run_upgrade putting the sync connection in
    cfg.attributes["connection"] (which the scratch env.py uses instead of asyncio.run);
    a ticker task runs meanwhile; then a downgrade the same way. Last, the project's own
    env.py through the same door: command.current with a shared connection."""
    box = await lab.use(scratch)
    scripts = box.scripts("shared", slow={REV1: lab.sizes.slow_revision})
    cfg = scripts.config(url_of(lab))
    outcome, ticker, seconds = await while_ticking(upgrade_shared(lab.engine, cfg))
    lab.figure("run_sync upgrade (slow revision included)", seconds, "s")
    lab.figure("run_sync upgrade: longest event-loop gap", 1000 * ticker.longest_gap, "ms")
    after = await state(lab.engine, scripts)
    lab.check(
        "connection sharing: upgrade head from the running loop",
        "env.py finds the connection in cfg.attributes and runs the migrations on it, in the "
        "caller's transaction (engine.begin() commits it): both revisions applied.",
        expected={"outcome": "ok", **AT_HEAD},
        observed={"outcome": outcome, **after},
    )
    expected_ticks = 0.3 * lab.sizes.slow_revision / 0.01
    lab.check(
        "the event loop keeps serving other tasks meanwhile",
        "run_sync runs Alembic's sync code in a greenlet that gives the loop back at every "
        "wait on the server: a 10 ms ticker keeps ticking through the slow revision's "
        f"pg_sleep({lab.sizes.slow_revision:g}).",
        expected=at_least(expected_ticks),
        observed=ticker.ticks,
    )
    down = "ok"
    try:
        await upgrade_shared(lab.engine, cfg, "base", downgrade=True)
    except Exception as exc:
        down = describe(exc)
    lab.check(
        "and a downgrade the same way",
        "command.downgrade through the shared connection: the column and the table go, the "
        "version table stays, empty.",
        expected={"outcome": "ok", "version rows": [], "table columns": None},
        observed={"outcome": down, **await state(lab.engine, scripts)},
    )

    def current(sync_conn: Connection) -> str:
        project = migrations.alembic_config()
        project.stdout = io.StringIO()
        project.attributes["connection"] = sync_conn
        command.current(project)
        return str(project.stdout.getvalue()).strip()

    try:
        async with lab.engine.connect() as conn:
            shown = await conn.run_sync(current)
    except Exception as exc:
        shown = describe(exc)
    lab.check(
        "the project's env.py takes the same door",
        "src/alembic/env.py uses config.attributes['connection'] when it is there (what "
        "orm_async_tests.migrations.upgrade relies on): command.current through a shared "
        "connection, inside the running loop, reads the project's revision without "
        "asyncio.run (read-only: current never writes).",
        expected=f"{migrations.head_revision()} (head)",
        observed=shown,
    )


@run.scenario
async def command_upgrade_in_a_thread(lab: Lab[Sizes]) -> None:
    """await asyncio.to_thread(command.upgrade, cfg, "head") with the template's env.py
    unchanged (no connection shared): its asyncio.run() starts a loop of its own in the
    worker thread, with its own NullPool engine; a ticker task runs meanwhile."""
    box = await lab.use(scratch)
    scripts = box.scripts("thread", slow={REV1: lab.sizes.slow_revision})
    cfg = scripts.config(url_of(lab))
    outcome, ticker, seconds = await while_ticking(asyncio.to_thread(command.upgrade, cfg, "head"))
    lab.figure("to_thread upgrade (slow revision included)", seconds, "s")
    lab.figure("to_thread upgrade: longest event-loop gap", 1000 * ticker.longest_gap, "ms")
    lab.check(
        "command.upgrade in a worker thread works",
        "asyncio.run() is allowed in a thread with no running loop: the template's env.py "
        "runs as it does from the command line (own engine, own connection, own commit).",
        expected={"outcome": "ok", **AT_HEAD},
        observed={"outcome": outcome, **await state(lab.engine, scripts)},
    )
    lab.check(
        "and the application's loop is free meanwhile",
        "The application's loop only awaits the thread: the 10 ms ticker keeps ticking.",
        expected=at_least(0.3 * lab.sizes.slow_revision / 0.01),
        observed=ticker.ticks,
    )


# ---------------------------------------------------------------- scenario 2: two at once
RACES = ("empty", "live", "locked")
"""The races the two children run, in this order (see :func:`races`)."""
RACERS = ("a", "b")


def upgrade_when_told(me: str, gate: str, races: list[dict[str, Any]]) -> dict[str, Any]:
    """In a child: for each race in turn, wait until every racer is at its start line (a
    file each in ``gate``), then ``upgrade head`` on that race's scratch scripts as the
    command line does it (env.py's asyncio.run); what it started and how it ended."""
    started: list[str] = []

    class Record(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if message.startswith(RUNNING_UPGRADE):
                started.append(message.split("->", 1)[1].split(",", 1)[0].strip())

    log = logging.getLogger("alembic.runtime.migration")
    log.setLevel(logging.INFO)
    log.addHandler(Record())
    found: dict[str, Any] = {}
    for one in races:
        scripts = Scripts(Path(one["location"]), one["schema"], "", one["version_table"])
        cfg = scripts.config(os.environ["DATABASE_URL"], lock=one["lock"])
        Path(gate, f"{one['name']}-{me}").touch()
        deadline = time.monotonic() + 30
        while not all(Path(gate, f"{one['name']}-{r}").exists() for r in RACERS):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{one['name']}: the other racer never came")
            time.sleep(0.002)
        started.clear()
        begun = time.perf_counter()
        try:
            command.upgrade(cfg, "head")
            outcome, state_ = "ok", None
        except Exception as exc:
            outcome, state_ = describe(exc), sqlstate(exc)
        found[one["name"]] = {
            "outcome": outcome,
            "sqlstate": state_,
            "started": list(started),
            "seconds": time.perf_counter() - begun,
        }
    return found


@dataclass(frozen=True)
class Race:
    """One race: its scripts and each racer's outcome."""

    scripts: Scripts
    outcomes: list[dict[str, Any]]


@asynccontextmanager
async def races(lab: Lab[Sizes]) -> AsyncIterator[dict[str, Race]]:
    """Two child processes (started once: the start-up is most of their time) run three
    races in turn, each racer waiting at every start line for the other: ``empty`` (a
    scratch database with no version table, REV1 slow), ``live`` (scripts already at
    REV1, upgraded first here through connection sharing; REV2 slow) and ``locked``
    (as ``empty``, env.py taking the advisory lock)."""
    box = await lab.use(scratch)
    slow = lab.sizes.slow_revision
    scripts = {
        "empty": box.scripts("race", slow={REV1: slow}),
        "live": box.scripts("deploy", slow={REV2: slow}),
        "locked": box.scripts("locked", slow={REV1: slow}),
    }
    await upgrade_shared(lab.engine, scripts["live"].config(url_of(lab)), REV1)
    gate = box.root / "gate"
    gate.mkdir()
    plan = [
        {
            "name": name,
            "location": str(scripts[name].location),
            "version_table": scripts[name].version_table,
            "schema": scripts[name].schema,
            "lock": lock_key(lab.tag) if name == "locked" else None,
        }
        for name in RACES
    ]
    done = await asyncio.gather(
        *(
            child.call(lab, upgrade_when_told, me, str(gate), plan, within=lab.sizes.child_timeout)
            for me in RACERS
        )
    )
    per_racer = []
    for ran in done:
        if not ran.finished:
            tail = (ran.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"a racer failed ({ran.ended()}): {ran.error or tail}")
        per_racer.append(ran.value)
    yield {name: Race(scripts[name], [r[name] for r in per_racer]) for name in RACES}


def tally(lab: Lab[Sizes], outcomes: list[dict[str, Any]]) -> dict[str, Any]:
    """Figures and a note for a race; how many succeeded and what the failures were."""
    for racer, one in zip(RACERS, outcomes, strict=True):
        lab.figure(f"racer {racer}: upgrade head", one["seconds"], "s")
    lab.note("; ".join(f"{o['outcome']} (started {o['started']})" for o in outcomes))
    failed = [o for o in outcomes if o["outcome"] != "ok"]
    return {
        "succeeded": len(outcomes) - len(failed),
        "failed": len(failed),
        "sqlstate of the failure": [o["sqlstate"] for o in failed],
        "error": [o["outcome"] for o in failed],
    }


@run.scenario
async def two_upgrades_of_an_empty_database_without_a_lock(lab: Lab[Sizes]) -> None:
    """Two child processes run upgrade head at the same moment on an empty scratch
    database (no version table yet; REV1 slow), through the template's env.py, no lock."""
    found = (await lab.use(races))["empty"]
    lab.check(
        "without a lock, on an empty database: one succeeds, the other fails",
        "Both find no version table and both CREATE it; the second CREATE waits on the first "
        "transaction's uncommitted catalog row (pg_type's unique index on the table's row "
        "type) and, once the first commits, fails with a unique violation (23505): the error "
        "Flask-Migrate#311 reports, and what alembic#633 says Alembic does not guard against.",
        expected={
            "succeeded": 1,
            "failed": 1,
            "sqlstate of the failure": ["23505"],
            "error": [
                matches(
                    r"^IntegrityError: duplicate key value violates unique constraint "
                    r'"pg_type_typname_nsp_index"'
                )
            ],
        },
        observed=tally(lab, found.outcomes),
    )
    lab.check(
        "the database is at head all the same",
        "The winner applied both revisions; the loser's transaction rolled back whole.",
        expected=AT_HEAD,
        observed=await state(lab.engine, found.scripts),
    )


@run.scenario
async def two_upgrades_of_a_live_database_without_a_lock(lab: Lab[Sizes]) -> None:
    """Scratch scripts already at REV1, then two child processes upgrade head at the same
    moment (REV2 slow: pg_sleep, then ALTER TABLE ADD COLUMN), no lock: two replicas
    deploying the next release."""
    found = (await lab.use(races))["live"]
    lab.check(
        "without a lock, at the next release: the second ALTER fails",
        "Both read REV1 from the version table (a plain SELECT, no lock) and both run REV2. "
        "The first ALTER takes ACCESS EXCLUSIVE; the second waits for it and, once the first "
        "transaction commits, finds the column there: DuplicateColumn (42701). The "
        "version table itself never stops a second upgrade.",
        expected={
            "succeeded": 1,
            "failed": 1,
            "sqlstate of the failure": ["42701"],
            "error": [
                matches(r'^ProgrammingError: column "note" of relation "\w+" already exists')
            ],
        },
        observed=tally(lab, found.outcomes),
    )
    lab.check(
        "the database is at head",
        "The winner's REV2 is in; the loser rolled back.",
        expected=AT_HEAD,
        observed=await state(lab.engine, found.scripts),
    )


@run.scenario
async def two_upgrades_at_once_with_an_advisory_lock(lab: Lab[Sizes]) -> None:
    """The empty-database race again, with env.py taking a session-level pg_advisory_lock
    (the run's own key) on its connection before it runs the migrations."""
    found = (await lab.use(races))["locked"]
    tally(lab, found.outcomes)
    lab.check(
        "with the lock: both succeed, the second has nothing to do",
        "The second process waits for the lock until the first has committed, then reads the "
        "version table (at head) and runs no revision.",
        expected={"succeeded": 2, "revisions each started": [[], [REV1, REV2]]},
        observed={
            "succeeded": sum(o["outcome"] == "ok" for o in found.outcomes),
            "revisions each started": sorted(o["started"] for o in found.outcomes),
        },
    )
    lab.check(
        "the database is at head",
        "Applied once.",
        expected=AT_HEAD,
        observed=await state(lab.engine, found.scripts),
    )


# ---------------------------------------------------------------- scenario 3: the lock queue
WAITERS = text(
    """
    SELECT pid, pg_blocking_pids(pid) AS blockers FROM pg_stat_activity
    WHERE datname = current_database() AND application_name = :app
      AND wait_event_type = 'Lock'
    ORDER BY pid
    """
)


async def lock_waiters(engine: AsyncEngine, app: str) -> list[tuple[int, list[int]]]:
    """The backends of ``app`` waiting for a heavyweight lock, each with the PIDs that
    block it (``pg_blocking_pids``: holders of a conflicting lock and conflicting waiters
    ahead of it in the queue)."""
    async with engine.connect() as conn:
        rows = (await conn.execute(WAITERS, {"app": app})).all()
    return [(int(r.pid), [int(p) for p in r.blockers]) for r in rows]


@dataclass
class Queue:
    """What the lock-queue scenarios share: the scratch scripts at REV1, and the engines
    of the idle session, the migration and the readers (each its own application_name)."""

    scripts: Scripts
    cfg: Config
    idle: AsyncEngine
    migrate: AsyncEngine
    readers: AsyncEngine
    apps: dict[str, str]


@asynccontextmanager
async def lock_queue(lab: Lab[Sizes]) -> AsyncIterator[Queue]:
    """The scratch scripts upgraded to REV1 (the table exists, the column does not yet)
    and the three engines; the lab disposes the engines, :func:`scratch` drops the table."""
    box = await lab.use(scratch)
    scripts = box.scripts("queue")
    cfg = scripts.config(url_of(lab))
    apps = {role: lab.name(role) for role in ("idle", "migrate", "reader")}
    n = lab.sizes.readers
    queue = Queue(
        scripts,
        cfg,
        lab.unpooled(application_name=apps["idle"]),
        lab.one_connection(application_name=apps["migrate"]),
        lab.engine_with(
            application_name=apps["reader"], pool_size=n, max_overflow=0, pool_pre_ping=False
        ),
        apps,
    )
    await upgrade_shared(queue.migrate, cfg, REV1)
    yield queue


@dataclass
class Read:
    """One reader: when it started and ended (perf_counter), and how."""

    started: float
    ended: float
    outcome: str

    @property
    def waited(self) -> float:
        return self.ended - self.started


@dataclass
class Attempt:
    """One try of the migration: when (perf_counter), its outcome and SQLSTATE."""

    started: float
    ended: float
    outcome: str
    sqlstate: str | None


@dataclass
class Round:
    """One ALTER TABLE behind an idle transaction, with readers arriving after it."""

    released_at: float
    """When the idle session rolled back (perf_counter)."""
    reads: list[Read]
    attempts: list[Attempt]
    migration_blockers: list[str]
    reader_blockers: list[list[str]]


async def warm(engine: AsyncEngine, n: int) -> None:
    """Open ``n`` pooled connections at once, so no reader pays for a connect."""

    async def one(release: asyncio.Event) -> None:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
            await release.wait()

    release = asyncio.Event()
    tasks = [asyncio.create_task(one(release)) for _ in range(n)]
    await asyncio.sleep(0)
    try:
        await poll(lambda: _checked(engine), lambda k: k >= n, within=10, every=0.01)
    finally:
        release.set()
        await asyncio.gather(*tasks)


async def _checked(engine: AsyncEngine) -> int:
    return checked_out(engine)


async def alter_behind_idle(lab: Lab[Sizes], q: Queue, *, lock_timeout_ms: int | None) -> Round:
    """The idle session reads the table and stays idle in transaction for idle_for; the
    migration (REV1 -> REV2, ALTER TABLE ADD COLUMN) starts; once it waits for its lock,
    the readers start, each bounded; with ``lock_timeout_ms`` the migration retries."""
    size = lab.sizes
    bound = size.idle_for + 5
    await upgrade_shared(q.migrate, q.cfg, REV1, downgrade=True)  # back to REV1 (no-op there)
    await warm(q.readers, size.readers)
    attempts: list[Attempt] = []
    released: list[float] = []

    async def migrate() -> None:
        deadline = time.perf_counter() + bound
        while True:
            began = time.perf_counter()
            try:
                await upgrade_shared(q.migrate, q.cfg, lock_timeout_ms=lock_timeout_ms)
            except DBAPIError as exc:
                attempts.append(Attempt(began, time.perf_counter(), describe(exc), sqlstate(exc)))
                if lock_timeout_ms is None or sqlstate(exc) != "55P03":
                    return
                if time.perf_counter() > deadline:
                    return
                await asyncio.sleep(size.retry_pause)
                continue
            attempts.append(Attempt(began, time.perf_counter(), "ok", None))
            return

    async def read() -> Read:
        began = time.perf_counter()
        try:
            async with asyncio.timeout(bound), q.readers.connect() as conn:
                await conn.execute(text(f"SELECT count(*) FROM {q.scripts.qualified}"))
            outcome = "ok"
        except TimeoutError:
            outcome = "TimeoutError"
        except Exception as exc:
            outcome = describe(exc)
        return Read(began, time.perf_counter(), outcome)

    names: dict[int, str] = {}
    reader_blockers: list[list[str]] = []
    migration_blockers: list[str] = []
    async with q.idle.connect() as idle:
        names[int(await idle.scalar(text("SELECT pg_backend_pid()")) or 0)] = "idle session"
        await idle.execute(text(f"SELECT count(*) FROM {q.scripts.qualified}"))
        hold_until = time.perf_counter() + size.idle_for
        migration = asyncio.create_task(migrate())
        readers: list[asyncio.Task[Read]] = []
        try:
            waiting = await poll(
                lambda: lock_waiters(lab.engine, q.apps["migrate"]),
                lambda w: bool(w) or migration.done(),
                within=size.idle_for,
                every=0.005,
            )
            if waiting.value:
                pid, blockers = waiting.value[0]
                names[pid] = "migration"
                migration_blockers = sorted(names.get(p, f"pid {p}") for p in blockers)
            readers = [asyncio.create_task(read()) for _ in range(size.readers)]
            if lock_timeout_ms is None:
                queued = await poll(
                    lambda: lock_waiters(lab.engine, q.apps["reader"]),
                    lambda w: len(w) >= size.readers,
                    within=max(0.0, hold_until - time.perf_counter() - 0.1),
                    every=0.01,
                )
                reader_blockers = [
                    sorted(names.get(p, f"pid {p}") for p in blockers)
                    for _, blockers in queued.value
                ]
            await asyncio.sleep(max(0.0, hold_until - time.perf_counter()))
        finally:
            await idle.rollback()
            released.append(time.perf_counter())
            try:
                async with asyncio.timeout(bound):
                    reads = list(await asyncio.gather(*readers))
                    await migration
            finally:
                for task in [migration, *readers]:
                    task.cancel()
    return Round(released[0], reads, attempts, migration_blockers, reader_blockers)


def shown_waits(reads: list[Read]) -> str:
    return ", ".join(f"{r.waited:.3f}" for r in reads)


@run.scenario
async def alter_table_behind_an_idle_transaction(lab: Lab[Sizes]) -> None:
    """A session reads the scratch table and stays idle in transaction (ACCESS SHARE) for
    idle_for; the migration REV1 -> REV2 (ALTER TABLE ADD COLUMN, needs ACCESS EXCLUSIVE)
    starts through connection sharing; once it is seen waiting, `readers` sessions each
    run SELECT count(*) on the table, bounded; pg_blocking_pids says who waits for whom."""
    q = await lab.use(lock_queue)
    got = await alter_behind_idle(lab, q, lock_timeout_ms=None)
    waits = [r.waited for r in got.reads]
    lab.figure("without lock_timeout: readers' longest wait", max(waits), "s")
    lab.figure("without lock_timeout: readers' shortest wait", min(waits), "s")
    lab.figure(
        "without lock_timeout: migration took",
        got.attempts[-1].ended - got.attempts[0].started,
        "s",
    )
    lab.check(
        "the ALTER waits for the idle transaction",
        "ALTER TABLE needs ACCESS EXCLUSIVE, which conflicts with the ACCESS SHARE the idle "
        "session took by reading (PostgreSQL 'Explicit Locking', table-level locks): the "
        "migration waits, blocked by the idle session alone, and succeeds once it ends.",
        expected={"blocked by": ["idle session"], "attempts": ["ok"]},
        observed={
            "blocked by": got.migration_blockers,
            "attempts": [a.outcome for a in got.attempts],
        },
    )
    lab.check(
        "every reader queues behind the ALTER",
        "A reader's ACCESS SHARE does not conflict with the idle session's, but it does with "
        "the ALTER's pending ACCESS EXCLUSIVE, which is ahead in the lock queue: each reader "
        "waits, blocked by the migration (pg_blocking_pids counts a conflicting waiter ahead "
        "in the queue), not by the idle session.",
        expected=[["migration"]] * lab.sizes.readers,
        observed=got.reader_blockers,
    )
    lab.check(
        "the readers wait until the idle transaction ends",
        "No reader gets its rows before the idle session rolls back: each waits about the "
        "idle transaction's remaining time (the figures), and none times out.",
        expected={
            "outcomes": ["ok"] * lab.sizes.readers,
            "readers done before the idle session ended": 0,
        },
        observed={
            "outcomes": [r.outcome for r in got.reads],
            "readers done before the idle session ended": sum(
                r.ended < got.released_at for r in got.reads
            ),
        },
    )
    lab.note(f"readers' waits (s): {shown_waits(got.reads)}")


@run.scenario
async def lock_timeout_and_retry(lab: Lab[Sizes]) -> None:
    """The same, back at REV1, with SET LOCAL lock_timeout = lock_timeout_ms in the
    migration's transaction and a retry loop (retry_pause between attempts) while it fails
    with LockNotAvailable."""
    q = await lab.use(lock_queue)
    size = lab.sizes
    got = await alter_behind_idle(lab, q, lock_timeout_ms=size.lock_timeout_ms)
    waits = [r.waited for r in got.reads]
    lab.figure("with lock_timeout: readers' longest wait", max(waits), "s")
    lab.figure("with lock_timeout: attempts", len(got.attempts))
    first = got.attempts[0]
    lab.figure("with lock_timeout: first attempt gave up after", first.ended - first.started, "s")
    lab.check(
        "the ALTER gives up fast with LockNotAvailable",
        "With lock_timeout the ALTER waits at most that long for its lock, then fails with "
        "SQLSTATE 55P03 (lock_not_available), and the whole migration transaction rolls "
        "back. The SQLAlchemy class differs by driver: psycopg's LockNotAvailable is an "
        "OperationalError, while the asyncpg dialect maps LockNotAvailableError to the bare "
        "DBAPIError, so an `except OperationalError` retry loop never retries on asyncpg: "
        "retry on the SQLSTATE.",
        expected={
            "sqlstate": "55P03",
            "error": on(
                asyncpg=prefix("DBAPIError: canceling statement due to lock timeout"),
                psycopg=prefix("OperationalError: canceling statement due to lock timeout"),
            ),
            "seconds": less_than(size.lock_timeout_ms / 1000 + 0.4),
        },
        observed={
            "sqlstate": first.sqlstate,
            "error": first.outcome,
            "seconds": first.ended - first.started,
        },
    )
    lab.check(
        "the readers are not held up",
        "Readers that arrive while an attempt waits queue behind it for what is left of its "
        "lock_timeout at most; then they take their ACCESS SHARE beside the idle session's: "
        "all done long before the idle session ends.",
        expected={
            "outcomes": ["ok"] * size.readers,
            "readers done before the idle session ended": size.readers,
            "longest wait (s)": at_most(size.lock_timeout_ms / 1000 + 0.3),
        },
        observed={
            "outcomes": [r.outcome for r in got.reads],
            "readers done before the idle session ended": sum(
                r.ended < got.released_at for r in got.reads
            ),
            "longest wait (s)": max(waits),
        },
    )
    last = got.attempts[-1]
    lab.check(
        "a retry succeeds once the idle session ends",
        "The retry loop tries again after each LockNotAvailable; the attempt after the idle "
        "session ended gets the lock and the migration lands.",
        expected={
            "failed attempts": each("55P03"),
            "last attempt": "ok",
            "last attempt ended after the idle session": True,
            "state": AT_HEAD,
        },
        observed={
            "failed attempts": [a.sqlstate for a in got.attempts[:-1]],
            "last attempt": last.outcome,
            "last attempt ended after the idle session": last.ended >= got.released_at,
            "state": await state(lab.engine, q.scripts),
        },
    )
    lab.note(f"readers' waits (s): {shown_waits(got.reads)}")
