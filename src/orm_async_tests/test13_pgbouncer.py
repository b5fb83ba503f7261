"""Which asyncpg, psycopg and SQLAlchemy settings survive PgBouncer's transaction
pooling, and what error do the defaults give?

In transaction pooling, PgBouncer hands each *transaction* of a client
connection to whichever server connection is free. asyncpg (and SQLAlchemy's
asyncpg dialect on top of it) prepares every statement under a name
(``__asyncpg_stmt_N__``) and caches it per client connection, expecting to find
it on "its" server connection in the next transaction. PgBouncer before 1.21
does not track protocol-level prepared statements, so names go missing or
collide. psycopg 3 prepares too, later: a query executed ``prepare_threshold``
times (5 by default) on one connection is prepared as ``_pg3_N``, a name numbered per
client connection. This experiment drives a concurrent load through PgBouncer with each
configuration of the run's driver and counts the errors. PgBouncer 1.21+ with
``max_prepared_statements > 0`` tracks protocol-level prepared statements: the last
scenario runs the defaults there (it reports SKIPPED with the version found on an
older one), and the scenarios that show the failures report SKIPPED on such a PgBouncer.

It needs ``PGBOUNCER_URL`` (a PgBouncer in transaction mode in front of a
PostgreSQL; ``.ci/start-pgbouncer`` starts Debian's on 127.0.0.1:6432, and
``docker compose up -d pgbouncer`` one on 127.0.0.1:6432 too). Without it every
scenario reports SKIPPED with the reason, never passed.

Sources: SQLAlchemy asyncpg dialect docs, "Prepared Statement Cache" and
"Prepared Statement Name with PGBouncer" (``prepared_statement_name_func`` with
``NullPool``); asyncpg FAQ "Why am I getting prepared statement errors?"
(``statement_cache_size=0``) and issue MagicStack/asyncpg#837; psycopg docs,
"Prepared statements" (``prepare_threshold``, ``None`` to disable, and the note on
PgBouncer in transaction mode); PgBouncer docs,
"Feature matrix for pooling modes" and ``max_prepared_statements`` (1.21+).
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import psycopg
from sqlalchemy import Integer, bindparam, func, literal_column, select, text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import NullPool, Pool

from .db import Target, create_engine
from .lab import (
    BadSizes,
    Lab,
    at_least,
    child,
    contains,
    describe,
    each,
    experiment,
    more_than,
    not_,
)
from .settings import Settings, with_driver


@dataclasses.dataclass(frozen=True)
class Sizes:
    tasks: int = 6
    """Concurrent clients per configuration."""
    rounds: int = 10
    """Transactions each client runs, one after the other."""
    pool_size: int = 3
    """Client connections of a pooled engine (max_overflow=0)."""

    def __post_init__(self) -> None:
        if self.tasks < 1 or self.pool_size < 1:
            raise BadSizes(
                f"tasks ({self.tasks}) and pool_size ({self.pool_size}) must be at least 1"
            )
        if self.rounds < 2:
            raise BadSizes(
                f"rounds ({self.rounds}) must be at least 2: a client connection's "
                "transactions can move between server connections only if it runs several"
            )


run = experiment(13, "asyncpg and psycopg behind PgBouncer (transaction pooling)", Sizes)

PLUS_ONE = select(bindparam("x", type_=Integer) + literal_column("1"))
NEGATE = select(bindparam("x", type_=Integer) * literal_column("-1"))


def unique_name() -> str:
    return f"__asyncpg_{uuid.uuid4()}__"


@dataclasses.dataclass(frozen=True)
class Config:
    """One way to configure the engine for PgBouncer."""

    label: str
    sqlalchemy_cache: int | None = None  # prepared_statement_cache_size (dialect, URL query)
    asyncpg_cache: int | None = None  # statement_cache_size (asyncpg.connect)
    name_func: Callable[[], str] | None = None  # prepared_statement_name_func (asyncpg)
    poolclass: type[Pool] | None = None
    driver: str = "asyncpg"
    never_prepare: bool = False  # prepare_threshold=None (psycopg.connect)


DEFAULT = Config("defaults (pooled, both statement caches on)")
BOTH_CACHES_OFF = Config(
    "statement_cache_size=0 + prepared_statement_cache_size=0", sqlalchemy_cache=0, asyncpg_cache=0
)
DOCS_RECIPE = Config(
    "NullPool + prepared_statement_name_func", name_func=unique_name, poolclass=NullPool
)
NAME_FUNC_ONLY = Config("prepared_statement_name_func alone (pooled)", name_func=unique_name)
NULLPOOL_ONLY = Config("NullPool alone", poolclass=NullPool)
ASYNCPG_CACHE_OFF = Config("statement_cache_size=0 alone", asyncpg_cache=0)
PSYCOPG_DEFAULT = Config("psycopg defaults (pooled, prepare_threshold=5)", driver="psycopg")
PSYCOPG_NEVER_PREPARE = Config(
    "psycopg prepare_threshold=None (pooled)", driver="psycopg", never_prepare=True
)
CONFIGS = (DEFAULT, BOTH_CACHES_OFF, DOCS_RECIPE, NAME_FUNC_ONLY, NULLPOOL_ONLY, ASYNCPG_CACHE_OFF)
SAFE = {"asyncpg": BOTH_CACHES_OFF, "psycopg": PSYCOPG_NEVER_PREPARE}
"""A configuration that works through PgBouncer, per driver (the reachability probe)."""
ASYNCPG_ONLY = "the configurations are asyncpg's statement caches and names"


def bouncer_engine(
    settings: Settings, url: URL, config: Config, pool_size: int, app: str
) -> AsyncEngine:
    """An engine on PgBouncer's URL (another server than the lab's: built here, in this
    process or in a child) configured as ``config`` says."""
    settings = dataclasses.replace(settings, schema=None)  # no search_path startup option
    url = with_driver(url, config.driver)
    args: dict[str, Any] = {}
    if config.never_prepare:
        args["prepare_threshold"] = None
    if config.asyncpg_cache is not None:
        args["statement_cache_size"] = config.asyncpg_cache
    if config.name_func is not None:
        args["prepared_statement_name_func"] = config.name_func
    if config.sqlalchemy_cache is not None:
        url = url.update_query_dict({"prepared_statement_cache_size": str(config.sqlalchemy_cache)})
    # a short pool_timeout: a case that stalls shows as a figure, not as minutes of waiting
    options: dict[str, Any] = {"pool_pre_ping": False}
    if config.poolclass is None:
        options.update(pool_size=pool_size, max_overflow=0, pool_timeout=5)
    return create_engine(
        settings,
        Target(url),
        poolclass=config.poolclass,
        application_name=app,
        driver_args=args,
        **options,
    )


async def drive(
    engine: AsyncEngine, tasks: int, rounds: int, backends: dict[int, set[int]] | None = None
) -> list[str]:
    """``tasks`` clients, each running ``rounds`` short transactions of two statements.

    With ``backends``, also record which server backend (``pg_backend_pid()``) ran each
    transaction, per client connection.
    """
    errors: list[str] = []

    async def client(n: int) -> None:
        for r in range(rounds):
            value = n * 1000 + r
            try:
                async with engine.begin() as conn:
                    # two statements with the same parameter signature: if one is executed
                    # under the other's name, the answer is wrong, without any error
                    plus = await conn.scalar(PLUS_ONE, {"x": value})
                    minus = await conn.scalar(NEGATE, {"x": value})
                    if (plus, minus) != (value + 1, -value):
                        errors.append(f"wrong result: {value} gave {plus} and {minus}")
                    if backends is not None:
                        pid = await conn.scalar(select(func.pg_backend_pid()))
                        raw = await conn.get_raw_connection()
                        backends.setdefault(id(raw.dbapi_connection), set()).add(int(pid or 0))
            except Exception as exc:
                errors.append(describe(exc))

    await asyncio.gather(*(client(n) for n in range(tasks)))
    return errors


async def nullpool_process(
    label: str, tasks: int, rounds: int, pool_size: int, app: str
) -> list[str]:
    """In a child process (its own asyncpg statement counter): drive one configuration
    through ``PGBOUNCER_URL``; the errors."""
    settings = Settings.from_env()
    url = settings.pgbouncer_url
    if url is None:
        raise RuntimeError("the child got no PGBOUNCER_URL")
    config = next(c for c in CONFIGS if c.label == label)
    engine = bouncer_engine(settings, url, config, pool_size, app)
    try:
        return await asyncio.wait_for(drive(engine, tasks, rounds), 60)
    finally:
        await engine.dispose()


async def fresh_servers(url: URL) -> str | None:
    """Ask PgBouncer's admin console to replace its server connections (``RECONNECT``), so
    a case starts without statements prepared by earlier clients. ``None`` when done,
    else why not (the admin console needs the user in ``admin_users``)."""
    try:
        admin = await asyncpg.connect(
            url.set(drivername="postgresql", database="pgbouncer").render_as_string(False),
            statement_cache_size=0,
            timeout=5,
        )
    except Exception as exc:
        return describe(exc)
    try:
        await admin.execute(f"RECONNECT {url.database}")  # simple protocol: the console's only
    except Exception as exc:
        return describe(exc)
    finally:
        await admin.close()
    return None


async def tracking(url: URL) -> tuple[str, int | None]:
    """PgBouncer's ``SHOW VERSION`` (``"PgBouncer 1.18.0"``) and its
    ``max_prepared_statements`` (``None``: the setting does not exist, before 1.21), from
    the admin console (psycopg: the console speaks the simple query protocol only, which
    psycopg uses for a statement without parameters)."""
    admin_url = url.set(drivername="postgresql", database="pgbouncer")
    async with await psycopg.AsyncConnection.connect(
        admin_url.render_as_string(False), autocommit=True, connect_timeout=5
    ) as admin:
        version = (await (await admin.execute("SHOW VERSION")).fetchall())[0][0]
        config = await (await admin.execute("SHOW CONFIG")).fetchall()
    limit = next((int(row[1]) for row in config if row[0] == "max_prepared_statements"), None)
    return str(version), limit


def version_of(shown: str) -> tuple[int, ...]:
    """``(1, 18, 0)`` from ``"PgBouncer 1.18.0"``."""
    found = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", shown)
    return tuple(int(n) for n in found.groups("0")) if found else (0,)


async def server_port(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(text("SELECT inet_server_port()")) or 0)


def kinds(errors: list[str]) -> list[str]:
    """The distinct errors, each quoted name replaced by "…" (``__asyncpg_stmt_7__``)."""
    return sorted({re.sub(r'"[^"]*"', '"…"', e) for e in errors})


def summary(errors: list[str], total: int) -> str:
    if not errors:
        return f"0 of {total} transactions failed"
    return f"{len(errors)} of {total} failed: {'; '.join(kinds(errors))}"


@dataclasses.dataclass
class Bouncer:
    """The PgBouncer the scenarios drive, and what each configuration gave."""

    url: URL
    dialled: int
    """The port the clients dial (PgBouncer's)."""
    port: int
    """The port the server behind PgBouncer listens on (``inet_server_port()``)."""
    version: str
    """``SHOW VERSION`` on the admin console."""
    max_prepared: int | None
    """``max_prepared_statements`` (``None`` before 1.21, which does not have it)."""
    outcomes: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    """The errors of each configuration driven so far."""
    since_reconnect: list[str] = dataclasses.field(default_factory=list)
    """The configurations driven since PgBouncer last replaced its server connections
    (whose prepared statements are still on them)."""


class BouncerUnreachable(RuntimeError):
    """``PGBOUNCER_URL`` is set, but nothing answers there."""


@asynccontextmanager
async def bouncer(lab: Lab[Sizes]) -> AsyncIterator[Bouncer]:
    """``PGBOUNCER_URL``, once it answered; every scenario is skipped without it, and
    fails (ERROR) when it is set but does not answer."""
    url = lab.db.settings.pgbouncer_url
    if url is None:
        lab.skip(
            "no PgBouncer configured: set PGBOUNCER_URL=postgresql://user@host:6432/db "
            "(.ci/start-pgbouncer or `docker compose up -d pgbouncer` starts one)"
        )
    dialled = url.port or 5432  # asyncpg's default port, as for any PostgreSQL URL
    probe = bouncer_engine(lab.db.settings, url, SAFE[lab.cell.driver], 1, lab.tag)
    try:
        port = await asyncio.wait_for(server_port(probe), 15)
    except Exception as exc:  # configured but not answering: an error, not a skip
        raise BouncerUnreachable(
            f"PGBOUNCER_URL is set but {url.host}:{dialled} does not answer ({describe(exc)})"
        ) from exc
    finally:
        await probe.dispose()
    try:
        version, max_prepared = await asyncio.wait_for(tracking(url), 15)
    except Exception as exc:
        raise BouncerUnreachable(
            f"PgBouncer at {url.host}:{dialled} answers, but not its admin console "
            f"(SHOW VERSION needs the user in admin_users): {describe(exc)}"
        ) from exc
    yield Bouncer(url, dialled, port, version, max_prepared)


async def untracked(lab: Lab[Sizes]) -> Bouncer:
    """The PgBouncer, for a scenario that shows what goes wrong when it does not track
    prepared statements: skipped when this one does (1.21+, max_prepared_statements > 0)."""
    found = await lab.use(bouncer)
    if found.max_prepared:
        lab.skip(
            f"{found.version} tracks prepared statements (max_prepared_statements = "
            f"{found.max_prepared}): this scenario shows a PgBouncer that does not"
        )
    return found


async def drive_config(
    lab: Lab[Sizes],
    config: Config,
    *,
    fresh: bool,
    backends: dict[int, set[int]] | None = None,
) -> list[str]:
    """Drive ``config`` through PgBouncer (``fresh``: on new server connections first);
    the errors, also kept in the fixture's ``outcomes``."""
    found = await lab.use(bouncer)
    size = lab.sizes
    if fresh:
        refused = await fresh_servers(found.url)
        if refused is not None:
            lab.note(
                f"Could not make PgBouncer replace its server connections ({refused}): "
                "statements prepared by earlier clients stay on them, so results depend on "
                "what ran before."
            )
        else:
            found.since_reconnect.clear()
    engine = bouncer_engine(lab.db.settings, found.url, config, size.pool_size, lab.tag)
    try:
        with lab.timed(f"{config.label}: {size.tasks * size.rounds} transactions"):
            errors = await asyncio.wait_for(drive(engine, size.tasks, size.rounds, backends), 60)
    finally:
        await engine.dispose()
    found.outcomes[config.label] = errors
    found.since_reconnect.append(config.label)
    return errors


def failures(errors: list[str]) -> dict[str, Any]:
    return {"failed": len(errors), "errors (distinct)": kinds(errors)}


PREPARED_ERRORS = {"failed": at_least(1), "errors (distinct)": each(contains("prepared statement"))}
"""What a configuration that breaks through PgBouncer gives: some failures, each a
prepared statement error."""
NO_ERRORS = {"failed": 0, "errors (distinct)": []}


@run.scenario
async def name_func_alone(lab: Lab[Sizes]) -> None:
    """The clients on a pooled engine with prepared_statement_name_func (uuid names) and
    both statement caches on, starting on fresh server connections."""
    lab.only_on("asyncpg", ASYNCPG_ONLY)
    await untracked(lab)
    errors = await drive_config(lab, NAME_FUNC_ONLY, fresh=True)
    lab.check(
        "prepared_statement_name_func alone is not enough",
        "Unique statement names avoid collisions but, with the caches on and a pool, a "
        "cached statement is still missing on the next server connection: some "
        "transactions fail, each with a prepared statement error.",
        expected=PREPARED_ERRORS,
        observed=failures(errors),
    )


@run.scenario
async def defaults(lab: Lab[Sizes]) -> None:
    """The clients on a pooled engine with the defaults, starting on fresh server
    connections (what they prepare stays there for the next scenarios)."""
    lab.only_on("asyncpg", ASYNCPG_ONLY)
    await untracked(lab)
    errors = await drive_config(lab, DEFAULT, fresh=True)
    lab.check(
        "defaults fail through transaction pooling",
        "With asyncpg's and SQLAlchemy's statement caches on (the defaults), a statement "
        "prepared in one transaction is looked for on another server connection: "
        "'prepared statement \"__asyncpg_stmt_N__\" does not exist' (or 'already exists'); "
        "some transactions fail, each with a prepared statement error.",
        expected=PREPARED_ERRORS,
        observed=failures(errors),
    )


@run.scenario
async def both_caches_off(lab: Lab[Sizes]) -> None:
    """The clients on a pooled engine with statement_cache_size=0 and
    prepared_statement_cache_size=0, on the server connections the defaults left their
    statements on; which server backend ran each transaction of each client connection."""
    lab.only_on("asyncpg", ASYNCPG_ONLY)
    found = await untracked(lab)
    if DEFAULT.label not in found.since_reconnect:  # run alone (--only): leave them there
        await drive_config(lab, DEFAULT, fresh=False)
    leftovers = DEFAULT.label in found.since_reconnect
    backends: dict[int, set[int]] = {}
    errors = await drive_config(lab, BOTH_CACHES_OFF, fresh=False, backends=backends)
    lab.figure("client connections tracked", len(backends))
    lab.check(
        "transactions move between server connections",
        "Through PgBouncer in transaction mode, the transactions of one client connection run "
        "on several server backends (the mechanism behind the errors below), and the server "
        "is not listening on the port the client dialled.",
        expected={
            "most server backends behind one client connection": more_than(1),
            "server port": not_(found.dialled),
        },
        observed={
            "most server backends behind one client connection": max(
                (len(pids) for pids in backends.values()), default=0
            ),
            "server port": found.port,
        },
    )
    lab.check(
        f"works: {BOTH_CACHES_OFF.label}",
        "With statement_cache_size=0 (asyncpg) and prepared_statement_cache_size=0 "
        "(SQLAlchemy) statements are unnamed and never reused: every transaction "
        "succeeds, pooled, even on server connections that carry other clients' "
        "statements (those the defaults prepared).",
        expected={**NO_ERRORS, "the defaults' statements left on the server connections": True},
        observed={
            **failures(errors),
            "the defaults' statements left on the server connections": leftovers,
        },
    )


@run.scenario
async def docs_recipe(lab: Lab[Sizes]) -> None:
    """The clients with SQLAlchemy's documented recipe (NullPool +
    prepared_statement_name_func), on the same leftover server connections; then with
    asyncpg's statement_cache_size=0 alone (a note: observed, not a recommendation)."""
    lab.only_on("asyncpg", ASYNCPG_ONLY)
    await untracked(lab)
    errors = await drive_config(lab, DOCS_RECIPE, fresh=False)
    lab.check(
        f"works: {DOCS_RECIPE.label}",
        "SQLAlchemy's documented recipe (NullPool + prepared_statement_name_func with "
        "uuid names) makes every transaction succeed, leftovers or not.",
        expected=NO_ERRORS,
        observed=failures(errors),
    )
    alone = await drive_config(lab, ASYNCPG_CACHE_OFF, fresh=False)
    lab.note(
        f"{ASYNCPG_CACHE_OFF.label}: {summary(alone, lab.sizes.tasks * lab.sizes.rounds)} "
        "(observed; the documentation asks for both caches off)."
    )


def child_errors(done: child.ChildRun) -> list[str]:
    """What a child's :func:`nullpool_process` returned, or one error saying how it failed."""
    if done.finished:
        return [str(e) for e in done.value]
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return [f"child process failed ({done.ended()}): {done.error or tail}"]


@run.scenario
async def nullpool_alone_in_two_processes(lab: Lab[Sizes]) -> None:
    """Fresh server connections, then NullPool alone in one child process and, after it
    ended, in a second one (an application restarted, or a second worker): asyncpg numbers
    statement names per process, from 1."""
    lab.only_on("asyncpg", ASYNCPG_ONLY)
    found = await untracked(lab)
    size = lab.sizes
    refused = await fresh_servers(found.url)
    if refused is not None:
        lab.note(f"Could not make PgBouncer replace its server connections ({refused}).")
    env = {"PGBOUNCER_URL": found.url.render_as_string(hide_password=False)}
    args = (NULLPOOL_ONLY.label, size.tasks, size.rounds, size.pool_size, lab.tag)
    first = child_errors(await child.call(lab, nullpool_process, *args, within=120, env=env))
    second = child_errors(await child.call(lab, nullpool_process, *args, within=120, env=env))
    found.outcomes["NullPool alone, first process"] = first
    found.outcomes["NullPool alone, second process"] = second
    lab.check(
        "NullPool alone: the next process fails",
        "asyncpg names statements __asyncpg_stmt_N__ from a counter per process, so one "
        "process with NullPool never repeats a name; but the server connections keep the "
        "statements after its clients are gone, and the next process (a restart, another "
        "worker) prepares the same names on them: 'prepared statement ... already exists'.",
        expected={
            "first process: errors (distinct)": [],
            "second process: failed": at_least(1),
            "second process: errors saying 'already exists'": at_least(1),
        },
        observed={
            "first process: errors (distinct)": kinds(first),
            "second process: failed": len(second),
            "second process: errors saying 'already exists'": sum(
                "already exists" in e for e in second
            ),
        },
    )
    wrong = sum(e.startswith("wrong result") for errors in found.outcomes.values() for e in errors)
    lab.figure("transactions that returned a wrong result, no error", wrong, "")
    lab.note(
        "The two statements of each transaction have the same parameter signature, so when "
        "a cached statement name meets another process's statement of that name on a server "
        "connection, the other statement runs and returns a wrong answer with no error "
        "(seen while developing this experiment: 'wrong result: 4000 gave 4001 and 4001'); "
        f"in this run, over every configuration driven: {wrong}. With different signatures "
        "the mix-up shows as 'bind message supplies N parameters'."
    )


@run.scenario
async def psycopg_prepare_threshold(lab: Lab[Sizes]) -> None:
    """The clients on a pooled psycopg engine with psycopg's defaults, on fresh server
    connections; then with prepare_threshold=None."""
    lab.only_on("psycopg", "prepare_threshold is psycopg's")
    await untracked(lab)
    errors = await drive_config(lab, PSYCOPG_DEFAULT, fresh=True)
    lab.check(
        "psycopg's defaults fail through transaction pooling",
        "After a query ran prepare_threshold (5) times on a client connection, psycopg "
        "prepares it as _pg3_N there and executes it by that name from then on; the next "
        'transaction runs on another server connection: \'prepared statement "_pg3_N" '
        "does not exist' (or 'already exists', names being numbered per client "
        "connection). Some transactions fail, each with a prepared statement error.",
        expected=PREPARED_ERRORS,
        observed=failures(errors),
    )
    never = await drive_config(lab, PSYCOPG_NEVER_PREPARE, fresh=False)
    lab.check(
        f"works: {PSYCOPG_NEVER_PREPARE.label}",
        "With prepare_threshold=None psycopg never prepares: every transaction succeeds, "
        "pooled, even on the server connections the defaults left their statements on.",
        expected=NO_ERRORS,
        observed=failures(never),
    )


@run.scenario
async def tracked_prepared_statements(lab: Lab[Sizes]) -> None:
    """The run's driver with its defaults (asyncpg: both statement caches on; psycopg:
    prepare_threshold=5) on fresh server connections of a PgBouncer 1.21+ with
    max_prepared_statements > 0; skipped, with the version found, on any other."""
    found = await lab.use(bouncer)
    if version_of(found.version) < (1, 21) or not found.max_prepared:
        lab.skip(
            f"{found.version} found (max_prepared_statements: "
            f"{'no such setting' if found.max_prepared is None else found.max_prepared}): "
            "protocol-level prepared statements through transaction pooling need PgBouncer "
            "1.21+ with max_prepared_statements > 0"
        )
    config = DEFAULT if lab.cell.driver == "asyncpg" else PSYCOPG_DEFAULT
    errors = await drive_config(lab, config, fresh=True)
    lab.check(
        "PgBouncer 1.21+ tracking prepared statements: the defaults work",
        "With max_prepared_statements > 0 PgBouncer tracks the statements each client "
        "prepares (protocol-level Parse/Bind/Close, under names of its own) and prepares them "
        "on whichever server connection runs the next transaction: the driver's defaults "
        "(asyncpg's and SQLAlchemy's caches, psycopg's prepare_threshold) need no change, "
        "every transaction succeeds.",
        expected=NO_ERRORS,
        observed=failures(errors),
    )
