"""Experiment 13: asyncpg behind PgBouncer in transaction pooling mode.

In transaction pooling, PgBouncer hands each *transaction* of a client
connection to whichever server connection is free. asyncpg (and SQLAlchemy's
asyncpg dialect on top of it) prepares every statement under a name
(``__asyncpg_stmt_N__``) and caches it per client connection, expecting to find
it on "its" server connection in the next transaction. PgBouncer before 1.21
does not track protocol-level prepared statements, so names go missing or
collide. This experiment drives a concurrent load through PgBouncer with each
configuration and counts the errors.

It needs ``PGBOUNCER_URL`` (a PgBouncer in transaction mode in front of a
PostgreSQL; ``.ci/start-pgbouncer`` starts Debian's on 127.0.0.1:6432, and
``docker compose up -d pgbouncer`` one on 127.0.0.1:6432 too). Without it the
experiment reports SKIPPED with the reason, never passed.

Sources: SQLAlchemy asyncpg dialect docs, "Prepared Statement Cache" and
"Prepared Statement Name with PGBouncer" (``prepared_statement_name_func`` with
``NullPool``); asyncpg FAQ "Why am I getting prepared statement errors?"
(``statement_cache_size=0``) and issue MagicStack/asyncpg#837; PgBouncer docs,
"Feature matrix for pooling modes" and ``max_prepared_statements`` (1.21+).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import uuid
from collections.abc import Callable
from typing import Any

import asyncpg
from sqlalchemy import Integer, bindparam, func, literal_column, select, text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import NullPool, Pool

from .db import Target, create_engine
from .errors import explain
from .harness import Lab, describe, experiment, run_python
from .settings import Settings

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
CONFIGS = (DEFAULT, BOTH_CACHES_OFF, DOCS_RECIPE, NAME_FUNC_ONLY, NULLPOOL_ONLY, ASYNCPG_CACHE_OFF)


def bouncer_engine(
    settings: Settings, url: URL, config: Config, pool_size: int, app: str
) -> AsyncEngine:
    settings = dataclasses.replace(settings, schema=None)  # no search_path startup option
    args: dict[str, Any] = {}
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


def child(label: str, tasks: int, rounds: int, pool_size: int, app: str) -> None:
    """Entry point of the child process: drive one case, print its errors as JSON."""
    settings = Settings.from_env()
    url = settings.pgbouncer_url
    assert url is not None
    config = next(c for c in CONFIGS if c.label == label)

    async def main() -> list[str]:
        engine = bouncer_engine(settings, url, config, pool_size, app)
        try:
            return await asyncio.wait_for(drive(engine, tasks, rounds), 60)
        finally:
            await engine.dispose()

    print(json.dumps(asyncio.run(main())))


async def in_child_process(
    lab: Lab, config: Config, tasks: int, rounds: int, pool_size: int
) -> list[str]:
    """Run one case in a new Python process (its own asyncpg statement counter)."""
    assert lab.db.settings.pgbouncer_url is not None
    bouncer = lab.db.settings.pgbouncer_url.render_as_string(hide_password=False)
    code = (
        f"from {__name__} import child; "
        f"child({config.label!r}, {tasks}, {rounds}, {pool_size}, {lab.tag!r})"
    )
    done = await run_python(lab, code, within=120, extra_env={"PGBOUNCER_URL": bouncer})
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return [f"child process failed ({done.returncode}): {tail}"]
    return [str(e) for e in json.loads(lines[-1])]


async def fresh_servers(url: URL) -> str | None:
    """Ask PgBouncer's admin console to replace its server connections (``RECONNECT``), so
    every case starts without statements prepared by earlier clients. ``None`` when done,
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


async def server_port(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(text("SELECT inet_server_port()")) or 0)


def summary(errors: list[str], total: int) -> str:
    if not errors:
        return f"0 of {total} transactions failed"
    kinds = sorted({re.sub(r'"[^"]*"', '"…"', e.split(") ", 1)[-1]) for e in errors})
    return f"{len(errors)} of {total} failed: {'; '.join(kinds)}"


@experiment(13, "asyncpg behind PgBouncer (transaction pooling)")
async def run(lab: Lab, *, tasks: int = 6, rounds: int = 10, pool_size: int = 3) -> None:
    """Which asyncpg/SQLAlchemy settings survive PgBouncer's transaction pooling, and what
    error do the defaults give?"""
    url = lab.db.settings.pgbouncer_url
    if url is None:
        lab.skip(
            "no PgBouncer configured: set PGBOUNCER_URL=postgresql://user@host:6432/db "
            "(.ci/start-pgbouncer or `docker compose up -d pgbouncer` starts one)"
        )
    dialled = url.port or 5432  # asyncpg's default port, as for any PostgreSQL URL
    where = f"{url.host}:{dialled}"
    probe = bouncer_engine(lab.db.settings, url, BOTH_CACHES_OFF, 1, lab.tag)
    try:
        port = await asyncio.wait_for(server_port(probe), 15)
    except Exception as exc:
        lab.skip(f"no PgBouncer at {where} ({explain(exc) or describe(exc)})")
    finally:
        await probe.dispose()

    total = tasks * rounds
    outcomes: dict[str, list[str]] = {}
    backends: dict[int, set[int]] = {}
    cannot_reset: list[str] = []
    # (case, start on fresh server connections?): the cases after DEFAULT meet the
    # statements its clients left on PgBouncer's server connections.
    plan = [
        (NAME_FUNC_ONLY, True),
        (DEFAULT, True),
        (BOTH_CACHES_OFF, False),
        (DOCS_RECIPE, False),
        (ASYNCPG_CACHE_OFF, False),
    ]
    for config, fresh in plan:
        refused = await fresh_servers(url) if fresh else None
        if refused is not None and refused not in cannot_reset:
            cannot_reset.append(refused)
        engine = bouncer_engine(lab.db.settings, url, config, pool_size, lab.tag)
        track = backends if config is BOTH_CACHES_OFF else None
        try:
            with lab.timed(f"{config.label}: {total} transactions"):
                outcomes[config.label] = await asyncio.wait_for(
                    drive(engine, tasks, rounds, track), 60
                )
        finally:
            await engine.dispose()

    if cannot_reset:
        lab.note(
            "Could not make PgBouncer replace its server connections between cases "
            f"({'; '.join(cannot_reset)}): statements prepared by earlier clients stay on "
            "them, so results depend on what ran before."
        )
    most = max((len(pids) for pids in backends.values()), default=0)
    lab.check(
        "transactions move between server connections",
        "Through PgBouncer in transaction mode, the transactions of one client connection run "
        "on several server backends (the mechanism behind the errors below), and the server "
        "is not listening on the port the client dialled.",
        expected=f"> 1 backend for some client connection; server port != {dialled}",
        observed=f"up to {most} backends for one of {len(backends)} client connections; "
        f"server port {port}",
        passed=most > 1 and port != dialled,
    )
    failing = outcomes[DEFAULT.label]
    lab.check(
        "defaults fail through transaction pooling",
        "With asyncpg's and SQLAlchemy's statement caches on (the defaults), a statement "
        "prepared in one transaction is looked for on another server connection: "
        "'prepared statement \"__asyncpg_stmt_N__\" does not exist' (or 'already exists').",
        expected="> 0 failed transactions, prepared statement errors",
        observed=summary(failing, total),
        passed=bool(failing) and all("prepared statement" in e for e in failing),
    )
    named = outcomes[NAME_FUNC_ONLY.label]
    lab.check(
        "prepared_statement_name_func alone is not enough",
        "Unique statement names avoid collisions but, with the caches on and a pool, a "
        "cached statement is still missing on the next server connection.",
        expected="> 0 failed transactions",
        observed=summary(named, total),
        passed=bool(named) and all("prepared statement" in e for e in named),
    )
    # NullPool alone, in two processes one after the other (an application restarted, or
    # a second worker): asyncpg numbers statement names per process, from 1.
    await fresh_servers(url)
    first = await in_child_process(lab, NULLPOOL_ONLY, tasks, rounds, pool_size)
    second = await in_child_process(lab, NULLPOOL_ONLY, tasks, rounds, pool_size)
    lab.check(
        "NullPool alone: the next process fails",
        "asyncpg names statements __asyncpg_stmt_N__ from a counter per process, so one "
        "process with NullPool never repeats a name; but the server connections keep the "
        "statements after its clients are gone, and the next process (a restart, another "
        "worker) prepares the same names on them: 'prepared statement ... already exists'.",
        expected="first process: 0 failed; second: > 0 failed, 'already exists'",
        observed=f"first: {summary(first, total)}; second: {summary(second, total)}",
        passed=not first and any("already exists" in e for e in second),
    )
    for config, claim in (
        (
            BOTH_CACHES_OFF,
            "With statement_cache_size=0 (asyncpg) and prepared_statement_cache_size=0 "
            "(SQLAlchemy) statements are unnamed and never reused: every transaction "
            "succeeds, pooled, even on server connections that carry other clients' "
            "statements.",
        ),
        (
            DOCS_RECIPE,
            "SQLAlchemy's documented recipe (NullPool + prepared_statement_name_func with "
            "uuid names) makes every transaction succeed, leftovers or not.",
        ),
    ):
        errors = outcomes[config.label]
        lab.check(
            f"works: {config.label}",
            claim,
            expected=f"0 of {total} transactions failed",
            observed=summary(errors, total),
            passed=not errors,
        )
    wrong = sum(e.startswith("wrong result") for errors in outcomes.values() for e in errors)
    lab.figure("transactions that returned a wrong result, no error", wrong, "")
    lab.note(
        "The two statements of each transaction have the same parameter signature, so when "
        "a cached statement name meets another process's statement of that name on a server "
        "connection, the other statement runs and returns a wrong answer with no error "
        "(seen while developing this experiment: 'wrong result: 4000 gave 4001 and 4001'); "
        f"in this run: {wrong}. With different signatures the mix-up shows as 'bind message "
        "supplies N parameters'."
    )
    lab.note(
        f"{ASYNCPG_CACHE_OFF.label}: {summary(outcomes[ASYNCPG_CACHE_OFF.label], total)} "
        "(observed; the documentation asks for both caches off)."
    )
