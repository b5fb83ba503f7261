"""Which session state (SET, SET LOCAL, set_config, SET ROLE, a temp table, a prepared
statement, LISTEN) survives the return of a pooled connection into the next request, and
when does a row-level-security tenant set with a plain SET leak into a request that forgets
to set its own?

Every scenario uses engines of one pooled connection (``lab.one_connection``: pool_size=1,
max_overflow=0), so request 2 gets request 1's connection; each check says whether request 2
ran on request 1's backend (``pg_backend_pid()``). Request 1 sets custom parameters four
ways (``SET``, ``SET LOCAL``, ``set_config(..., false)``, ``set_config(..., true)``),
creates a temp table, ``PREPARE``s a statement, ``LISTEN``s, ``SET ROLE``s to a scratch role
(created for the run, dropped after it), and commits or not; request 2 reads all of it.
``pg_stat_activity`` shows the backend's state and last statement after each return, and
the pool's ``reset`` event the ``PoolResetState``. Then the same with a ``checkin`` listener
that runs ``RESET ALL``, and with ``pool_reset_on_return=None`` plus a ``reset`` listener
that rolls back and runs ``DISCARD ALL`` (the custom reset the SQLAlchemy docs describe;
``PoolEvents.reset`` takes ``reset_state`` since 2.0, ``checkin`` is older; both lines have
both). The second half is a multi-tenant table with ROW LEVEL SECURITY and a policy on
``current_setting('app.tenant', true)``. The embedded server, like the external one here,
connects as a superuser, which bypasses every policy, so those requests run on engines whose
connections take the scratch role at connect time (the ``role`` parameter: asyncpg
``server_settings``, psycopg ``options=-c``), as an application's own login role would.

Observed (the same on asyncpg and psycopg, SQLAlchemy 2.0 and 2.1, PostgreSQL 18 and 15,
except where a driver is named): SQLAlchemy's reset on return is a call to the DBAPI
connection's ``rollback()`` (the reset event reports ``transaction_was_reset`` False every
time); both adapters send ``ROLLBACK`` only when a transaction is open, so after a committed
request nothing is sent and everything session-scoped reaches request 2: the ``SET`` and
``set_config(..., false)`` values, the role, the temp table, the prepared statement, the
LISTEN. Only ``SET LOCAL``/``set_config(..., true)`` end with the transaction (and a custom
parameter the session has seen then reads ``''``, not NULL). asyncpg's own reset on release
(``Connection.reset``: RESET ALL, UNLISTEN * and more) belongs to asyncpg's Pool and is not
run. A request that never commits is rolled back as its session closes, which undoes SET,
set_config, SET ROLE, the temp table and LISTEN alike; PREPARE is not transactional and
survives on asyncpg, while psycopg, once it has prepared one of its own statements (after
``prepare_threshold`` = 5 executions), follows that ROLLBACK with ``DEALLOCATE ALL``, which
drops the application's prepared statement too. ``RESET ALL`` on checkin resets the
parameters but not the role (``SET ROLE`` survives it), nor the temp table, prepared
statement or LISTEN. ``DISCARD ALL`` resets everything; psycopg notices it (its prepared
statement manager clears itself on that command status) and the next request works, but on
asyncpg the next request fails at the first statement the connection had already run,
'prepared statement "__asyncpg_stmt_N__" does not exist': SQLAlchemy's adapter cache and
asyncpg's statement cache still name statements DISCARD ALL deallocated. Turning off only
SQLAlchemy's cache (``prepared_statement_cache_size=0``) is not enough (the pre-ping's
``fetchrow(';')`` goes through asyncpg's cache and fails a later checkout; the connection
is invalidated); turning off asyncpg's (``statement_cache_size=0``, unnamed statements) is.
Row-level security: the superuser sees every row with no tenant set; the scratch role sees
none, and exactly one tenant's rows with ``SET LOCAL app.tenant``. A tenant set with plain
``SET`` (or ``set_config(..., false)``) in a request that commits leaks: request 2, which
sets none, sees all of acme's rows. The same SET in a request that does not commit is undone
by the rollback, so the leak hides from read-only tests. ``SET LOCAL`` and
``set_config(..., true)`` per transaction do not leak; ``SET LOCAL`` on an AUTOCOMMIT
connection does nothing at all (each statement is its own transaction: no rows, it fails
closed). A ``RESET ALL`` checkin listener and a ``DISCARD ALL`` reset listener both stop the
leak, and DISCARD ALL's ``SET SESSION AUTHORIZATION DEFAULT`` keeps the role given at
connect time: the connection does not turn back into the superuser.

Sources: PostgreSQL docs, ``SET`` (a SET in a transaction that is later aborted disappears;
after a commit it persists until the end of the session; SET LOCAL lasts until the end of
the transaction): confirmed; "System Administration Functions", ``set_config(...,
is_local)`` and ``current_setting(..., missing_ok)`` (NULL when missing): confirmed, with
``''`` once the session has seen the parameter; ``RESET``: observed not to reset ``role``;
``DISCARD`` (ALL = CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; DEALLOCATE ALL;
UNLISTEN *; ...; not inside a transaction block): confirmed; ``LISTEN`` (takes effect at
commit; a rolled-back LISTEN changes nothing): confirmed; ``PREPARE`` (lasts for the
session): confirmed, a rollback does not undo it; 5.9 "Row Security Policies" (superusers
and BYPASSRLS roles always bypass; owners unless FORCE): confirmed for the superuser.
SQLAlchemy docs, "Connection Pooling" - "Reset On Return" (a rollback on return; a custom
reset through the ``reset`` event with ``pool_reset_on_return=None``): confirmed;
``PoolEvents.reset``/``checkin`` and ``PoolResetState``; asyncpg dialect, "Prepared
Statement Cache" (``prepared_statement_cache_size``) and "Prepared Statement Name with
PGBouncer" (DISCARD on return advised together with NullPool, so no client cache outlives
it): consistent, with a pooled engine DISCARD ALL breaks asyncpg as observed. asyncpg
source, ``Connection.get_reset_query`` (what asyncpg's Pool runs on release): not run by
SQLAlchemy, confirmed; its ``_get_statement`` (unnamed statements with the cache off):
consistent with ``statement_cache_size=0`` working. psycopg source, ``PrepareManager`` (it
clears its cache on ROLLBACK, DISCARD ALL, DEALLOCATE ALL, DROP, ALTER and then sends
DEALLOCATE ALL) and ``rollback()`` (nothing sent when idle): confirmed. Issue threads, as
observed: MagicStack/asyncpg#270 (asyncpg's reset avoids DISCARD ALL because it would drop
the prepared statements asyncpg keeps): confirmed from the other side, an application's
DISCARD ALL breaks them; MagicStack/asyncpg#121 (the "__asyncpg_stmt_N__ does not exist"
error): reproduced; sqlalchemy/sqlalchemy#6467 (statement_cache_size and DEALLOCATE ALL
behind PgBouncer) and #10226 (the asyncpg pre-ping goes through a prepared statement):
consistent, the pre-ping's cached statement is what fails after DISCARD ALL with only
SQLAlchemy's cache off; typeorm/typeorm#5857 (a tenant parameter set per pooled connection
for RLS): the leak reproduced with SQLAlchemy's pool; OWASP/CheatSheetSeries#2309 (FORCE
ROW LEVEL SECURITY does not stop a superuser): confirmed, hence the scratch role.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import TextClause, event, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from .compat import await_
from .lab import BadSizes, Lab, describe, experiment, matches, on, probes
from .lab.probes import checked_out

BOUND = 5.0
"""Upper bound (s) of every request and probe in this module: a hang becomes an error."""
PSYCOPG_THRESHOLD = 5
"""psycopg's default ``prepare_threshold``: a query runs unprepared that many times, and is
prepared server-side (``_pg3_N``) at the next execution."""
VALUE = "request-1"
"""What request 1 sets every setting to."""


@dataclass(frozen=True)
class Sizes:
    acme_rows: int = 3
    """Rows of tenant 'acme' in the row-level-security table (the tenant request 1 sets)."""
    globex_rows: int = 2
    """Rows of tenant 'globex' (a different count, so a count says whose rows were seen)."""
    repeats: int = 6
    """Times request 1 runs one query before it returns its connection (above psycopg's
    prepare_threshold, 5, psycopg prepares it, and its ROLLBACK then sends DEALLOCATE ALL)."""

    def __post_init__(self) -> None:
        if self.acme_rows < 1 or self.globex_rows < 1:
            raise BadSizes("acme_rows and globex_rows must be at least 1: a leak needs rows")
        if self.acme_rows == self.globex_rows:
            raise BadSizes(
                f"acme_rows and globex_rows are both {self.acme_rows}: with equal counts a "
                "count does not say whose rows a request saw"
            )
        if self.repeats < 1:
            raise BadSizes("repeats must be at least 1")


run = experiment(21, "Session state through the pool", Sizes)


# ---------------------------------------------------------------- names and statements


@dataclass(frozen=True)
class Names:
    """This run's scratch names (roles are cluster-wide: the tag keeps them apart)."""

    ident: str

    @property
    def role(self) -> str:
        return f"{self.ident}app"

    @property
    def table(self) -> str:
        return f"{self.ident}docs"

    @property
    def temp(self) -> str:
        return f"{self.ident}tmp"

    @property
    def prepared(self) -> str:
        return f"{self.ident}prep"

    @property
    def channel(self) -> str:
        return f"{self.ident}chan"


def names_of(lab: Lab[Sizes]) -> Names:
    return Names(lab.tag.replace("-", "_"))


SETTINGS = {
    "SET": "oat21.by_set",
    "SET LOCAL": "oat21.by_set_local",
    "set_config(is_local=false)": "oat21.by_config",
    "set_config(is_local=true)": "oat21.by_config_local",
}
"""Each way of setting a (custom) parameter, and the parameter it sets."""

STATE = text(
    """
    SELECT current_setting('oat21.by_set', true),
           current_setting('oat21.by_set_local', true),
           current_setting('oat21.by_config', true),
           current_setting('oat21.by_config_local', true),
           current_user,
           to_regclass('pg_temp.' || :temp) IS NOT NULL,
           EXISTS (SELECT FROM pg_prepared_statements WHERE name = :prepared),
           :channel = ANY (ARRAY(SELECT pg_listening_channels())),
           pg_backend_pid()
    """
)
STATE_KEYS = (
    *SETTINGS,
    "SET ROLE: current_user",
    "temp table",
    "PREPARE'd statement",
    "LISTEN",
)
REPEATED = text("SELECT 1 + :x")
"""The query request 1 runs ``repeats`` times."""


async def read_state(session: AsyncSession, names: Names) -> tuple[dict[str, Any], int]:
    """Every piece of session state this experiment sets, and the backend's pid."""
    row = (
        await session.execute(
            STATE, {"temp": names.temp, "prepared": names.prepared, "channel": names.channel}
        )
    ).one()
    return dict(zip(STATE_KEYS, row[:-1], strict=True)), int(row[-1])


async def leave_state(session: AsyncSession, names: Names, repeats: int) -> dict[str, Any]:
    """Request 1: every kind of session state, then what it reads of it."""
    for _ in range(repeats):
        await session.execute(REPEATED, {"x": 1})
    await session.execute(text(f"SET {SETTINGS['SET']} = '{VALUE}'"))
    await session.execute(text(f"SET LOCAL {SETTINGS['SET LOCAL']} = '{VALUE}'"))
    await session.execute(
        text("SELECT set_config(:a, :v, false), set_config(:b, :v, true)"),
        {
            "a": SETTINGS["set_config(is_local=false)"],
            "b": SETTINGS["set_config(is_local=true)"],
            "v": VALUE,
        },
    )
    await session.execute(text(f"CREATE TEMP TABLE {names.temp} (x int)"))
    await session.execute(text(f"PREPARE {names.prepared} AS SELECT 1"))
    await session.execute(text(f"LISTEN {names.channel}"))
    await session.execute(text(f"SET ROLE {names.role}"))
    state, _ = await read_state(session, names)
    return state


def everything_set(names: Names) -> dict[str, Any]:
    """What request 1 reads inside its own transaction: everything it set."""
    return {
        **dict.fromkeys(SETTINGS, VALUE),
        "SET ROLE: current_user": names.role,
        "temp table": True,
        "PREPARE'd statement": True,
        "LISTEN": True,
    }


# ---------------------------------------------------------------- pools and probes


@dataclass
class Pool:
    """A one-connection engine, its sessions, and what its ``reset`` event reported."""

    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    resets: list[dict[str, bool]] = field(default_factory=list)


def one_pool(lab: Lab[Sizes], label: str, **overrides: Any) -> Pool:
    """``lab.one_connection`` (one pooled connection, pre-ping as configured), with every
    ``reset`` event recorded (``PoolResetState``: transaction_was_reset, terminate_only)."""
    engine = lab.one_connection(application_name=lab.name(label), **overrides)
    pool = Pool(engine, lab.sessions_on(engine))

    def record(dbapi_connection: Any, connection_record: Any, reset_state: Any) -> None:
        pool.resets.append(
            {
                "transaction_was_reset": bool(reset_state.transaction_was_reset),
                "terminate_only": bool(reset_state.terminate_only),
            }
        )

    event.listen(engine.sync_engine, "reset", record)
    return pool


async def backend(lab: Lab[Sizes], pid: int) -> dict[str, Any]:
    """What pg_stat_activity says of backend ``pid`` now: its state and the last statement
    it ran (the pool's reset, if it sent one, is that statement)."""
    async with asyncio.timeout(BOUND), lab.engine.connect() as conn:
        row = (
            await conn.execute(
                text("SELECT state, query FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}
            )
        ).one_or_none()
    if row is None:
        return {"state": "gone", "last statement": None}
    return {"state": str(row.state), "last statement": str(row.query).strip()}


@dataclass(frozen=True)
class Login:
    """The user the lab's engine connects as."""

    user: str
    superuser: bool
    bypass_rls: bool


async def login_of(lab: Lab[Sizes]) -> Login:
    async with asyncio.timeout(BOUND), lab.engine.connect() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT session_user, rolsuper, rolbypassrls FROM pg_roles "
                    "WHERE rolname = session_user"
                )
            )
        ).one()
    return Login(str(row[0]), bool(row[1]), bool(row[2]))


# ---------------------------------------------------------------- resets on return


def install_reset_all(engine: AsyncEngine) -> None:
    """A ``checkin`` listener: ``RESET ALL`` on every connection returned to the pool,
    through the DBAPI connection (it opens a transaction on both adapters: committed)."""

    def reset_all(dbapi_connection: Any, connection_record: Any) -> None:
        if dbapi_connection is None:  # invalidated: nothing to reset
            return
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("RESET ALL")
        finally:
            cursor.close()
        dbapi_connection.commit()

    event.listen(engine.sync_engine, "checkin", reset_all)


def install_discard_all(engine: AsyncEngine, driver: str) -> None:
    """A ``reset`` listener for an engine made with ``pool_reset_on_return=None``: roll back,
    then ``DISCARD ALL`` outside any transaction (it refuses to run in one), on the driver's
    connection: asyncpg's ``execute`` without arguments uses the simple query protocol (no
    prepared statement of its own), psycopg's runs in autocommit, unprepared."""

    def discard_all(dbapi_connection: Any, connection_record: Any, reset_state: Any) -> None:
        dbapi_connection.rollback()
        if reset_state.terminate_only:  # the connection is being closed anyway
            return
        raw = dbapi_connection.driver_connection
        if driver == "asyncpg":
            await_(raw.execute("DISCARD ALL"))
            return
        await_(raw.set_autocommit(True))
        try:
            await_(raw.execute("DISCARD ALL", prepare=False))
        finally:
            await_(raw.set_autocommit(False))

    event.listen(engine.sync_engine, "reset", discard_all)


ASYNCPG_CACHES_OFF = {"prepared_statement_cache_size": 0, "statement_cache_size": 0}
"""asyncpg connect arguments: SQLAlchemy's adapter cache of prepared statements off, and
asyncpg's own statement cache (used by fetchrow, so by pre-ping) off."""

STALE = matches(r'prepared statement "__asyncpg_stmt_\w+__" does not exist')


# ---------------------------------------------------------------- fixtures


@asynccontextmanager
async def scratch_role(lab: Lab[Sizes]) -> AsyncIterator[Names]:
    """A scratch role (NOLOGIN, not a superuser, no BYPASSRLS), dropped after the run with
    whatever was granted to it."""
    names = names_of(lab)
    async with asyncio.timeout(BOUND), lab.engine.begin() as conn:
        await conn.execute(text(f"CREATE ROLE {names.role} NOLOGIN NOSUPERUSER NOBYPASSRLS"))
    try:
        yield names
    finally:
        async with asyncio.timeout(BOUND), lab.engine.begin() as conn:
            await conn.execute(text("SET LOCAL lock_timeout = '3s'"))
            await conn.execute(text(f"DROP OWNED BY {names.role}"))
            await conn.execute(text(f"DROP ROLE {names.role}"))


@dataclass(frozen=True)
class Tenants:
    """The row-level-security table and the role its requests run as."""

    names: Names


@asynccontextmanager
async def tenant_table(lab: Lab[Sizes]) -> AsyncIterator[Tenants]:
    """The scratch table in the run's schema, owned by the connecting user, with ROW LEVEL
    SECURITY enabled and one policy, ``tenant = current_setting('app.tenant', true)``;
    acme_rows + globex_rows rows; SELECT granted to the scratch role, which is neither the
    owner nor a superuser, so the policy applies to it without FORCE ROW LEVEL SECURITY.
    Dropped after the run."""
    names = await lab.use(scratch_role)
    table = names.table
    sizes = lab.sizes
    async with asyncio.timeout(BOUND), lab.engine.begin() as conn:
        schema = str(await conn.scalar(text("SELECT current_schema()")))
        await conn.execute(text(f"CREATE TABLE {table} (id serial PRIMARY KEY, tenant text)"))
        await conn.execute(
            text(
                f"INSERT INTO {table} (tenant) SELECT 'acme' FROM generate_series(1, :a) "
                "UNION ALL SELECT 'globex' FROM generate_series(1, :g)"
            ),
            {"a": sizes.acme_rows, "g": sizes.globex_rows},
        )
        await conn.execute(text(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY"))
        await conn.execute(
            text(
                f"CREATE POLICY tenant_rows ON {table} "
                "USING (tenant = current_setting('app.tenant', true))"
            )
        )
        await conn.execute(text(f'GRANT USAGE ON SCHEMA "{schema}" TO {names.role}'))
        await conn.execute(text(f"GRANT SELECT ON {table} TO {names.role}"))
    try:
        yield Tenants(names)
    finally:
        async with asyncio.timeout(BOUND), lab.engine.begin() as conn:
            await conn.execute(text("SET LOCAL lock_timeout = '3s'"))
            await conn.execute(text(f"DROP TABLE IF EXISTS {table}"))


def tenant_pool(lab: Lab[Sizes], tenants: Tenants, label: str, **overrides: Any) -> Pool:
    """A one-connection engine whose connections run as the scratch role from the start
    (the ``role`` parameter at connect time: asyncpg server_settings, psycopg ``-c``), as an
    application's own non-superuser login would."""
    settings = {"role": tenants.names.role, **overrides.pop("server_settings", {})}
    return one_pool(lab, label, server_settings=settings, **overrides)


def tenant_count(names: Names) -> TextClause:
    """The rows a request sees, the tenant it has set, who it runs as, and its backend."""
    return text(
        "SELECT count(*), current_setting('app.tenant', true), current_user, pg_backend_pid() "
        f"FROM {names.table}"
    )


@dataclass(frozen=True)
class Seen:
    """What one request saw of the tenant table."""

    rows: int
    tenant: str | None
    user: str
    pid: int


async def rows_seen(session: AsyncSession, tenants: Tenants) -> Seen:
    row = (await session.execute(tenant_count(tenants.names))).one()
    return Seen(int(row[0]), row[1], str(row[2]), int(row[3]))


async def forgetful_request(pool: Pool, tenants: Tenants) -> Seen | str:
    """Request 2: it sets no tenant and counts the rows it sees (or the error it got)."""
    try:
        async with asyncio.timeout(BOUND), pool.sessions() as session:
            return await rows_seen(session, tenants)
    except Exception as exc:
        return describe(exc)


def seen_dict(seen: Seen | str) -> dict[str, Any] | str:
    if isinstance(seen, str):
        return seen
    return {"rows": seen.rows, "app.tenant": seen.tenant, "current_user": seen.user}


# ---------------------------------------------------------------- the scenarios


@run.scenario
async def the_next_request_gets_the_same_connection(lab: Lab[Sizes]) -> None:
    """On a one-connection engine, request 1 (a session that commits) and request 2 (a
    session that only reads and closes) each read pg_backend_pid(); the pool's reset event
    and pg_stat_activity show what happened to the connection on each return."""
    login = await login_of(lab)
    lab.note(f"The lab connects as {login.user} (superuser: {login.superuser}).")
    pool = one_pool(lab, "same")
    async with asyncio.timeout(BOUND):
        async with pool.sessions() as session:
            first = await probes.backend_pid(session)
            await session.commit()
        between = checked_out(pool.engine)
        after_commit = await backend(lab, first)
        async with pool.sessions() as session:
            second = await probes.backend_pid(session)
        after_close = await backend(lab, second)
    lab.check(
        "request 2 gets request 1's connection",
        "With pool_size=1 (max_overflow=0) request 2 runs on the very server process request "
        "1 used: whatever request 1 left in that session, request 2 meets.",
        expected={"request 2's backend pid": first, "checked out between the requests": 0},
        observed={"request 2's backend pid": second, "checked out between the requests": between},
    )
    lab.check(
        "the lab connects as a superuser",
        "The connecting user (the embedded server's postgres, and the external server's) is a "
        "superuser, which bypasses row-level security: the RLS scenarios below run their "
        "requests as a scratch non-superuser role instead.",
        expected={"superuser": True, "bypasses RLS": True},
        observed={
            "superuser": login.superuser,
            "bypasses RLS": login.superuser or login.bypass_rls,
        },
    )
    lab.check(
        "the reset on return: nothing after a commit, ROLLBACK after a read",
        "The pool's reset event fires on each return, with transaction_was_reset False: the "
        "pool calls the DBAPI connection's rollback() each time, and both adapters send a "
        "ROLLBACK only when a transaction is open. After the committed request the backend "
        "is idle and its last statement is the request's COMMIT: nothing was sent. The "
        "request that only read is rolled back: its last statement is ROLLBACK. Either way "
        "the connection goes back 'idle', never 'idle in transaction'.",
        expected={
            "reset events": [{"transaction_was_reset": False, "terminate_only": False}] * 2,
            "after the committing request": {
                "state": "idle",
                "last statement": matches(r"^COMMIT;?$"),
            },
            "after the reading request": {
                "state": "idle",
                "last statement": matches(r"^ROLLBACK;?$"),
            },
        },
        observed={
            "reset events": pool.resets,
            "after the committing request": after_commit,
            "after the reading request": after_close,
        },
    )


@run.scenario
async def state_after_a_committed_request(lab: Lab[Sizes]) -> None:
    """Request 1 runs one query `repeats` times, then SET, SET LOCAL, set_config(…, false),
    set_config(…, true), CREATE TEMP TABLE, PREPARE, LISTEN and SET ROLE (the scratch role),
    reads them, and commits; request 2, on the same connection, reads them."""
    names = await lab.use(scratch_role)
    pool = one_pool(lab, "committed")
    async with asyncio.timeout(BOUND):
        async with pool.sessions() as session:
            inside = await leave_state(session, names, lab.sizes.repeats)
            first = await probes.backend_pid(session)
            await session.commit()
        returned = await backend(lab, first)
        async with pool.sessions() as session:
            after, second = await read_state(session, names)
    lab.check(
        "request 1 sees everything it set",
        "Inside its own transaction request 1 reads back every setting, the role, the temp "
        "table, the prepared statement; LISTEN only takes effect at commit, so it is not "
        "listening yet.",
        expected={**everything_set(names), "LISTEN": False},
        observed=inside,
    )
    lab.check(
        "a committed request's session state reaches the next request",
        "Request 2 (same backend) inherits everything session-scoped that request 1 "
        "committed: the SET and set_config(…, false) values, the role (current_user is still "
        "the scratch role), the temp table, the prepared statement and the LISTEN; only SET "
        "LOCAL and set_config(…, true) ended with request 1's transaction (a placeholder "
        "setting the session has seen then reads '', not NULL). Same on asyncpg and psycopg: "
        "SQLAlchemy's pool does not run asyncpg's own reset (asyncpg's Pool runs RESET ALL, "
        "UNLISTEN * and more on release) nor any other.",
        expected={
            "same backend": True,
            "after the return": {"state": "idle", "last statement": matches(r"^COMMIT;?$")},
            **{
                **everything_set(names),
                "SET LOCAL": "",
                "set_config(is_local=true)": "",
            },
        },
        observed={"same backend": first == second, "after the return": returned, **after},
    )


@run.scenario
async def state_after_a_request_that_does_not_commit(lab: Lab[Sizes]) -> None:
    """The same request 1, except that it never commits: its session closes (the pool's
    ROLLBACK); request 2 reads the state on the same connection."""
    names = await lab.use(scratch_role)
    login = await login_of(lab)
    pool = one_pool(lab, "rolledback")
    async with asyncio.timeout(BOUND):
        async with pool.sessions() as session:
            await leave_state(session, names, lab.sizes.repeats)
            first = await probes.backend_pid(session)
        returned = await backend(lab, first)
        async with pool.sessions() as session:
            after, second = await read_state(session, names)
    psycopg_prepared = lab.sizes.repeats > PSYCOPG_THRESHOLD
    lab.check(
        "the rollback on return undoes a request's uncommitted session state",
        "SET, set_config(…, false), SET ROLE, CREATE TEMP TABLE and LISTEN are transactional: "
        "the ROLLBACK when request 1's session closes undoes them all, so request 2 reads '' "
        "for every setting and runs as the login user. PREPARE is not transactional and "
        "survives on asyncpg; psycopg, once it has prepared a statement of its own (request 1 "
        f"ran one query {lab.sizes.repeats} times, psycopg prepares after {PSYCOPG_THRESHOLD}), "
        "follows its ROLLBACK with DEALLOCATE ALL, which drops the application's PREPARE'd "
        "statement as well: the backend's last statement is then DEALLOCATE ALL.",
        expected={
            "same backend": True,
            "after the return": {
                "state": "idle",
                "last statement": on(
                    asyncpg=matches(r"^ROLLBACK;?$"),
                    psycopg="DEALLOCATE ALL" if psycopg_prepared else matches(r"^ROLLBACK;?$"),
                ),
            },
            **dict.fromkeys(SETTINGS, ""),
            "SET ROLE: current_user": login.user,
            "temp table": False,
            "PREPARE'd statement": on(asyncpg=True, psycopg=not psycopg_prepared),
            "LISTEN": False,
        },
        observed={"same backend": first == second, "after the return": returned, **after},
    )


@run.scenario
async def reset_all_on_checkin(lab: Lab[Sizes]) -> None:
    """A checkin listener runs RESET ALL (and commits) on every return; request 1 leaves the
    state and commits, request 2 reads it."""
    names = await lab.use(scratch_role)
    pool = one_pool(lab, "resetall")
    install_reset_all(pool.engine)
    async with asyncio.timeout(BOUND):
        async with pool.sessions() as session:
            await leave_state(session, names, lab.sizes.repeats)
            first = await probes.backend_pid(session)
            await session.commit()
        async with pool.sessions() as session:
            after, second = await read_state(session, names)
    lab.check(
        "RESET ALL on checkin resets the settings, not the role or the rest",
        "RESET ALL puts every parameter back to its session default ('' for the custom ones), "
        "but not the role: role is one of the parameters RESET ALL skips, so request 2 still "
        "runs as the role request 1 took with SET ROLE. The temp table, the prepared "
        "statement and the LISTEN are not parameters and stay too.",
        expected={
            "same backend": True,
            **dict.fromkeys(SETTINGS, ""),
            "SET ROLE: current_user": names.role,
            "temp table": True,
            "PREPARE'd statement": True,
            "LISTEN": True,
        },
        observed={"same backend": first == second, **after},
    )


@run.scenario
async def discard_all_on_reset(lab: Lab[Sizes]) -> None:
    """An engine made with pool_reset_on_return=None whose reset listener rolls back and
    runs DISCARD ALL; request 1 leaves the state (and reads it) and commits, request 2 runs
    the same read."""
    names = await lab.use(scratch_role)
    login = await login_of(lab)
    pool = one_pool(lab, "discard", pool_reset_on_return=None)
    install_discard_all(pool.engine, lab.cell.driver)
    async with asyncio.timeout(BOUND):
        async with pool.sessions() as session:
            await leave_state(session, names, lab.sizes.repeats)
            first = await probes.backend_pid(session)
            await session.commit()
        returned = await backend(lab, first)
        try:
            async with pool.sessions() as session:
                after, second = await read_state(session, names)
            found: dict[str, Any] | str = {"same backend": first == second, **after}
        except Exception as exc:
            found = describe(exc)
    psycopg_prepared = lab.sizes.repeats > PSYCOPG_THRESHOLD
    lab.check(
        "DISCARD ALL on return: everything reset on psycopg, stale statements on asyncpg",
        "DISCARD ALL resets the session entirely: settings, role (back to the login user), "
        "temp table, prepared statements, LISTEN. psycopg notices DISCARD ALL in the command "
        "status and forgets its own prepared statements (and, having some, sends DEALLOCATE "
        "ALL after it), so request 2 works. "
        "asyncpg does not: SQLAlchemy's asyncpg adapter (and asyncpg's statement cache) "
        "still hold request 1's prepared statements, which DISCARD ALL deallocated, and "
        "request 2's first statement already run on that connection fails with "
        "'prepared statement \"__asyncpg_stmt_N__\" does not exist'.",
        expected={
            "after the return": {
                "state": "idle",
                "last statement": on(
                    asyncpg="DISCARD ALL",
                    psycopg="DEALLOCATE ALL" if psycopg_prepared else "DISCARD ALL",
                ),
            },
            "request 2": on(
                asyncpg=STALE,
                psycopg={
                    "same backend": True,
                    **dict.fromkeys(SETTINGS, ""),
                    "SET ROLE: current_user": login.user,
                    "temp table": False,
                    "PREPARE'd statement": False,
                    "LISTEN": False,
                },
            ),
        },
        observed={"after the return": returned, "request 2": found},
    )


CACHE_CONFIGS: dict[str, dict[str, int]] = {
    "both caches off": ASYNCPG_CACHES_OFF,
    "prepared_statement_cache_size=0 only": {"prepared_statement_cache_size": 0},
    "statement_cache_size=0 only": {"statement_cache_size": 0},
}
"""asyncpg connect arguments tried under DISCARD ALL."""


async def after_discards(
    lab: Lab[Sizes], label: str, caches: dict[str, int]
) -> dict[str, list[str]]:
    """Request 1 leaves the state and commits, then three requests read it, on a DISCARD ALL
    engine (pre-ping on) with these asyncpg ``caches``: each read's outcome (``ok``: on
    request 1's backend, the session entirely reset), and the pool's invalidations."""
    names = await lab.use(scratch_role)
    login = await login_of(lab)
    pool = one_pool(lab, label, pool_reset_on_return=None, pool_pre_ping=True, driver_args=caches)
    install_discard_all(pool.engine, lab.cell.driver)
    invalidations = probes.Invalidations.on(pool.engine)
    reset = {
        **dict.fromkeys(SETTINGS, ""),
        "SET ROLE: current_user": login.user,
        "temp table": False,
        "PREPARE'd statement": False,
        "LISTEN": False,
    }
    outcomes: list[str] = []
    async with asyncio.timeout(BOUND):
        async with pool.sessions() as session:
            await leave_state(session, names, lab.sizes.repeats)
            first = await probes.backend_pid(session)
            await session.commit()
        for _ in range(3):
            try:
                async with pool.sessions() as session:
                    after, pid = await read_state(session, names)
            except Exception as exc:
                outcomes.append(describe(exc))
                continue
            if pid != first:
                outcomes.append("ran on a new connection")
            else:
                outcomes.append("ok" if after == reset else f"not reset: {after}")
    return {"requests 2-4": outcomes, "invalidated": invalidations.seen}


@run.scenario
async def discard_all_and_asyncpg_statement_caches(lab: Lab[Sizes]) -> None:
    """asyncpg only: the same DISCARD ALL reset (pre-ping on) with asyncpg's statement
    caches off: both, SQLAlchemy's adapter cache only (prepared_statement_cache_size=0),
    asyncpg's own only (statement_cache_size=0); request 1 leaves the state and commits,
    requests 2, 3 and 4 read it."""
    lab.only_on(
        "asyncpg",
        "the statement caches DISCARD ALL makes stale are SQLAlchemy's asyncpg adapter's and "
        "asyncpg's; psycopg forgets its own by itself (previous scenario)",
    )
    seen = {
        config: await after_discards(lab, f"discard-{i}", caches)
        for i, (config, caches) in enumerate(CACHE_CONFIGS.items())
    }
    lab.check(
        "DISCARD ALL on asyncpg needs asyncpg's own statement cache off",
        "With both caches off every request after a DISCARD ALL runs on the same connection "
        "and finds it entirely reset. SQLAlchemy's cache off alone is not enough: request 2's "
        "pre-ping runs fetchrow(';') through asyncpg's own cache (a named statement), the "
        "DISCARD ALL after request 2 deallocates it, and request 3's pre-ping fails with "
        "'prepared statement does not exist' (not a disconnect: the request fails, the "
        "connection is invalidated, the pool's invalidate event names the adapter's Error, "
        "and request 4 gets a new connection). asyncpg's cache off "
        "alone is enough here: asyncpg then prepares unnamed statements, which DISCARD ALL "
        "has nothing to invalidate in.",
        expected={
            "both caches off": {"requests 2-4": ["ok"] * 3, "invalidated": []},
            "prepared_statement_cache_size=0 only": {
                "requests 2-4": ["ok", STALE, "ran on a new connection"],
                "invalidated": ["Error"],
            },
            "statement_cache_size=0 only": {"requests 2-4": ["ok"] * 3, "invalidated": []},
        },
        observed=seen,
    )


@run.scenario
async def who_row_level_security_applies_to(lab: Lab[Sizes]) -> None:
    """The tenant table read with app.tenant unset by the lab's own (superuser) connection,
    then by a one-connection engine whose connections take the scratch role at connect
    time: unset, then SET LOCAL app.tenant to 'acme', then to 'globex', each in its own
    transaction."""
    tenants = await lab.use(tenant_table)
    sizes = lab.sizes
    async with asyncio.timeout(BOUND):
        async with lab.sessions() as session:
            admin = await rows_seen(session, tenants)
        pool = tenant_pool(lab, tenants, "rls")
        seen: dict[str, Any] = {}
        async with pool.sessions() as session:
            unset = await rows_seen(session, tenants)
            await session.commit()
            for tenant in ("acme", "globex"):
                await session.execute(text(f"SET LOCAL app.tenant = '{tenant}'"))
                seen[tenant] = (await rows_seen(session, tenants)).rows
                await session.commit()
            row = (
                await session.execute(
                    text("SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user")
                )
            ).one()
    lab.check(
        "a superuser bypasses the policy",
        "The connecting user is a superuser: with no tenant set it still sees every row of "
        "the table, policy or not. Testing RLS as that user proves nothing.",
        expected={"rows seen": sizes.acme_rows + sizes.globex_rows, "app.tenant": None},
        observed={"rows seen": admin.rows, "app.tenant": admin.tenant},
    )
    lab.check(
        "the scratch role is subject to the policy",
        "Connections that start as the scratch role (role set at connect time, as an "
        "application's own login would be) are not superusers and do not bypass RLS: with no "
        "tenant set they see no row (current_setting('app.tenant', true) is NULL), with "
        "SET LOCAL app.tenant they see exactly that tenant's rows.",
        expected={
            "current_user": tenants.names.role,
            "superuser, bypassrls": [False, False],
            "rows, no tenant": 0,
            "app.tenant, no tenant": None,
            "rows, acme": sizes.acme_rows,
            "rows, globex": sizes.globex_rows,
        },
        observed={
            "current_user": unset.user,
            "superuser, bypassrls": [bool(row[0]), bool(row[1])],
            "rows, no tenant": unset.rows,
            "app.tenant, no tenant": unset.tenant,
            "rows, acme": seen["acme"],
            "rows, globex": seen["globex"],
        },
    )


async def two_requests(
    pool: Pool, tenants: Tenants, set_tenant: str, *, commit: bool
) -> tuple[Seen, Seen | str]:
    """Request 1 sets the tenant with ``set_tenant`` (SQL) and counts, and commits unless
    told not to; request 2 forgets to set one and counts."""
    async with asyncio.timeout(BOUND):
        async with pool.sessions() as session:
            await session.execute(text(set_tenant))
            first = await rows_seen(session, tenants)
            if commit:
                await session.commit()
        second = await forgetful_request(pool, tenants)
    return first, second


def pair(first: Seen, second: Seen | str) -> dict[str, Any]:
    """Request 1's rows, and what request 2 saw (on the same backend)."""
    same = not isinstance(second, str) and second.pid == first.pid
    return {"request 1 rows": first.rows, "request 2": seen_dict(second), "same backend": same}


def same_connection(
    role: str, first_rows: int, *, leaked: tuple[str, int] | None = None
) -> dict[str, Any]:
    """What :func:`pair` is expected to find: request 1's rows, and request 2, on the same
    backend as the scratch role, seeing ``leaked`` (the tenant and its rows) or nothing."""
    tenant, rows = leaked or ("", 0)
    return {
        "request 1 rows": first_rows,
        "request 2": {"rows": rows, "app.tenant": tenant, "current_user": role},
        "same backend": True,
    }


@run.scenario
async def plain_set_leaks_the_tenant(lab: Lab[Sizes]) -> None:
    """Three one-connection engines as the scratch role. Request 1 sets app.tenant to
    'acme' with plain SET and commits; with plain SET and does not commit; with
    set_config(..., false) and commits. Each time request 2 sets nothing and counts."""
    tenants = await lab.use(tenant_table)
    role = tenants.names.role
    acme = lab.sizes.acme_rows
    committed = await two_requests(
        tenant_pool(lab, tenants, "set-commit"), tenants, "SET app.tenant = 'acme'", commit=True
    )
    rolled_back = await two_requests(
        tenant_pool(lab, tenants, "set-rollback"),
        tenants,
        "SET app.tenant = 'acme'",
        commit=False,
    )
    by_config = await two_requests(
        tenant_pool(lab, tenants, "config-commit"),
        tenants,
        "SELECT set_config('app.tenant', 'acme', false)",
        commit=True,
    )
    leaked = committed[1]
    if not isinstance(leaked, str):
        lab.figure("rows of acme seen by request 2 (plain SET, committed)", leaked.rows, "rows")
    lab.check(
        "plain SET: the next request sees the previous tenant's rows",
        "Request 1 sets the tenant with plain SET and commits: the setting is session-scoped, "
        "survives the return, and request 2, which set no tenant, reads every 'acme' row as "
        "if it were acme: a cross-tenant leak.",
        expected=same_connection(role, acme, leaked=("acme", acme)),
        observed=pair(*committed),
    )
    lab.check(
        "plain SET without a commit: the rollback on return hides the leak",
        "The same SET in a request that never commits is undone by the ROLLBACK when its "
        "session closes: request 2 sees no row. The leak depends on whether request 1 "
        "committed, which is why it passes read-only tests and shows up in production.",
        expected=same_connection(role, acme),
        observed=pair(*rolled_back),
    )
    lab.check(
        "set_config(..., false) leaks the same way",
        "set_config('app.tenant', 'acme', false) is plain SET as a function: committed, it "
        "leaks acme's rows to request 2.",
        expected=same_connection(role, acme, leaked=("acme", acme)),
        observed=pair(*by_config),
    )


@run.scenario
async def set_local_per_transaction(lab: Lab[Sizes]) -> None:
    """One-connection engines as the scratch role. Request 1 sets app.tenant with SET LOCAL
    and commits, request 2 sets nothing; then request 1 with set_config(..., true); then,
    on an AUTOCOMMIT connection, SET LOCAL followed by the count."""
    tenants = await lab.use(tenant_table)
    role = tenants.names.role
    sizes = lab.sizes
    local = await two_requests(
        tenant_pool(lab, tenants, "local"), tenants, "SET LOCAL app.tenant = 'acme'", commit=True
    )
    by_config = await two_requests(
        tenant_pool(lab, tenants, "config-local"),
        tenants,
        "SELECT set_config('app.tenant', 'globex', true)",
        commit=True,
    )
    pool = tenant_pool(lab, tenants, "autocommit")
    async with asyncio.timeout(BOUND), pool.engine.connect() as conn:
        auto = await conn.execution_options(isolation_level="AUTOCOMMIT")
        await auto.execute(text("SET LOCAL app.tenant = 'acme'"))
        row = (await auto.execute(tenant_count(tenants.names))).one()
    lab.check(
        "SET LOCAL: the tenant ends with the transaction",
        "SET LOCAL app.tenant lasts until request 1's COMMIT: request 1 sees acme's rows, "
        "request 2 on the same connection sees none (the setting reads '').",
        expected=same_connection(role, sizes.acme_rows),
        observed=pair(*local),
    )
    lab.check(
        "set_config(..., true): the same",
        "set_config('app.tenant', 'globex', true) is SET LOCAL as a function (and takes a bind "
        "parameter, which SET does not): request 1 sees globex's rows, request 2 none.",
        expected=same_connection(role, sizes.globex_rows),
        observed=pair(*by_config),
    )
    lab.check(
        "SET LOCAL outside a transaction does nothing",
        "On an AUTOCOMMIT connection each statement is its own transaction: SET LOCAL ends "
        "with itself (the server only warns), and the next statement sees no tenant and no "
        "row. It fails closed, but the tenant has to be set inside the transaction that "
        "reads.",
        expected={"rows": 0, "app.tenant": ""},
        observed={"rows": int(row[0]), "app.tenant": row[1]},
    )


@run.scenario
async def reset_on_return_against_the_leak(lab: Lab[Sizes]) -> None:
    """Plain SET app.tenant = 'acme' and commit in request 1, nothing in request 2, on two
    one-connection engines as the scratch role: one whose checkin listener runs RESET ALL,
    one made with pool_reset_on_return=None whose reset listener rolls back and runs
    DISCARD ALL (on asyncpg with its statement caches off, see above)."""
    tenants = await lab.use(tenant_table)
    role = tenants.names.role
    acme = lab.sizes.acme_rows
    plain = "SET app.tenant = 'acme'"
    resetting = tenant_pool(lab, tenants, "rls-resetall")
    install_reset_all(resetting.engine)
    after_reset = await two_requests(resetting, tenants, plain, commit=True)
    caches = ASYNCPG_CACHES_OFF if lab.cell.driver == "asyncpg" else {}
    discarding = tenant_pool(
        lab, tenants, "rls-discard", pool_reset_on_return=None, driver_args=caches
    )
    install_discard_all(discarding.engine, lab.cell.driver)
    after_discard = await two_requests(discarding, tenants, plain, commit=True)
    lab.check(
        "RESET ALL on checkin stops the leak",
        "The checkin listener's RESET ALL resets app.tenant before the connection goes back: "
        "request 2 sees no row, on the same connection, still as the scratch role (the role "
        "given at connect time is RESET ALL's default).",
        expected=same_connection(role, acme),
        observed=pair(*after_reset),
    )
    lab.check(
        "DISCARD ALL on reset stops the leak",
        "The reset listener's DISCARD ALL resets app.tenant too: request 2 sees no row. "
        "DISCARD ALL's SET SESSION AUTHORIZATION DEFAULT does not turn the connection back "
        "into the superuser: the role given at connect time is the session's default, and "
        "request 2 still runs as the scratch role.",
        expected=same_connection(role, acme),
        observed=pair(*after_discard),
    )
