"""Settings read from the environment, and the database URL rules.

Every knob the project has is an environment variable, read here and nowhere
else. ``.env.example`` lists them with their defaults.

``DATABASE_URL`` unset means "use the embedded PostgreSQL" (see
:mod:`orm_async_tests.embedded`). When it is set, ``postgresql://`` and
``postgres://`` URLs are accepted and given the async driver named by
``DB_DRIVER`` (``asyncpg`` unless told otherwise); a URL that already names an
async driver keeps it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

ASYNC_DRIVERS = ("asyncpg", "psycopg")
SYNC_DRIVERS = ("psycopg2", "pg8000", "psycopg2cffi", "pygresql")


class SettingsError(ValueError):
    """A setting has a value we cannot use; the message says which and why."""


@dataclass(frozen=True)
class Settings:
    """What the db module needs to build an engine. Read with :meth:`from_env`."""

    database_url: URL | None
    """``None``: start or reuse the embedded PostgreSQL."""
    driver: str = "asyncpg"
    pool_size: int = 5
    max_overflow: int = 10
    pool_timeout: float = 30.0
    pool_pre_ping: bool = True
    echo: bool = False
    connect_timeout: float = 5.0
    schema: str | None = None
    """PostgreSQL schema put first on the ``search_path`` of every connection."""
    embedded_data_dir: Path | None = None
    """``None``: the documented default (see :func:`embedded.default_data_dir`)."""
    pgbouncer_url: URL | None = None
    """A PgBouncer in transaction pooling mode (``PGBOUNCER_URL``), for experiment 13."""
    application_name: str = "orm-async-tests"
    """Shown in ``pg_stat_activity`` for this process's connections (``DB_APPLICATION_NAME``)."""
    api_host: str = "127.0.0.1"
    """Where ``poetry run api`` listens (``API_HOST``; ``0.0.0.0`` in the container)."""
    api_port: int = 8000
    """``API_PORT``."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        driver = env.get("DB_DRIVER", "asyncpg").strip() or "asyncpg"
        if driver not in ASYNC_DRIVERS:
            raise SettingsError(
                f"DB_DRIVER={driver!r} is not an async PostgreSQL driver; "
                f"use one of: {', '.join(ASYNC_DRIVERS)}"
            )
        raw_url = env.get("DATABASE_URL", "").strip()
        url = normalize_url(raw_url, driver) if raw_url else None
        if url is not None:
            driver = url.get_driver_name()
        data_dir = env.get("EMBEDDED_PGDATA", "").strip()
        raw_bouncer = env.get("PGBOUNCER_URL", "").strip()
        try:
            bouncer = normalize_url(raw_bouncer, "asyncpg") if raw_bouncer else None
        except SettingsError as exc:
            raise SettingsError(str(exc).replace("DATABASE_URL", "PGBOUNCER_URL")) from None
        schema = env.get("DB_SCHEMA", "").strip() or None
        if schema is not None and not schema.replace("_", "a").isalnum():
            raise SettingsError(f"DB_SCHEMA={schema!r}: use letters, digits and '_' only")
        return cls(
            database_url=url,
            driver=driver,
            pool_size=_int(env, "DB_POOL_SIZE", 5),
            max_overflow=_int(env, "DB_MAX_OVERFLOW", 10),
            pool_timeout=_float(env, "DB_POOL_TIMEOUT", 30.0),
            pool_pre_ping=_bool(env, "DB_PRE_PING", True),
            echo=_bool(env, "DB_ECHO", False),
            connect_timeout=_float(env, "DB_CONNECT_TIMEOUT", 5.0),
            schema=schema,
            embedded_data_dir=Path(data_dir).expanduser() if data_dir else None,
            pgbouncer_url=bouncer,
            application_name=env.get("DB_APPLICATION_NAME", "").strip() or "orm-async-tests",
            api_host=env.get("API_HOST", "").strip() or "127.0.0.1",
            api_port=_port(env, "API_PORT", 8000),
        )


def normalize_url(raw: str, driver: str = "asyncpg") -> URL:
    """Parse ``raw`` and return it as an async PostgreSQL URL.

    ``postgresql://`` / ``postgres://`` get ``+driver``; ``postgresql+asyncpg://``
    and ``postgresql+psycopg://`` are kept; a sync driver or another database is
    refused with a :class:`SettingsError` that says what to write instead.
    """
    try:
        url = make_url(raw)
        port = url.port  # a non-numeric port only fails when read
    except (ArgumentError, ValueError) as exc:
        why = "its port is not a number" if isinstance(exc, ValueError) else "it does not parse"
        raise SettingsError(
            f"DATABASE_URL is not a valid URL ({_shown(raw)}: {why}); "
            "expected postgresql://user:password@host:5432/dbname"
        ) from None
    backend = url.get_backend_name()
    if backend == "postgres":  # Heroku-style scheme
        url = url.set(drivername="postgresql")
        backend = "postgresql"
    if backend != "postgresql":
        raise SettingsError(
            f"DATABASE_URL names a {backend!r} database; this project needs PostgreSQL "
            "(postgresql://user:password@host:5432/dbname)"
        )
    given = url.drivername.partition("+")[2]
    if given in SYNC_DRIVERS:
        raise SettingsError(
            f"DATABASE_URL uses the sync driver {given!r}; use postgresql+asyncpg:// "
            "or postgresql+psycopg:// (or plain postgresql://)"
        )
    if given and given not in ASYNC_DRIVERS:
        raise SettingsError(
            f"DATABASE_URL names the unknown driver {given!r}; use one of: "
            f"{', '.join(ASYNC_DRIVERS)}"
        )
    if port is not None and not 0 < port < 65536:
        raise SettingsError(f"DATABASE_URL port {port} is out of range (1-65535)")
    if not url.database:
        raise SettingsError(f"DATABASE_URL names no database ({_shown(raw)}); add one: .../dbname")
    return url.set(drivername=f"postgresql+{given or driver}")


def with_driver(url: URL, driver: str) -> URL:
    """The same server and database through another async driver."""
    if driver not in ASYNC_DRIVERS:
        raise SettingsError(f"{driver!r} is not one of {', '.join(ASYNC_DRIVERS)}")
    return url.set(drivername=f"postgresql+{driver}")


def redacted(url: URL) -> str:
    """The URL as text with the password hidden: the only way a URL is printed."""
    return url.render_as_string(hide_password=True)


def _shown(raw: str) -> str:
    """A raw, possibly unparsable URL with anything password-like hidden."""
    scheme, sep, rest = raw.partition("://")
    if not sep:
        return "a value with no scheme://"
    creds, at, host = rest.rpartition("@")
    if at and ":" in creds:
        creds = creds.split(":", 1)[0] + ":***"
    return f"{scheme}://{creds}{at}{host}"


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a whole number") from None
    if value < 0:
        raise SettingsError(f"{name}={raw!r} must not be negative")
    return value


def _port(env: Mapping[str, str], name: str, default: int) -> int:
    port = _int(env, name, default)
    if not 0 < port < 65536:
        raise SettingsError(f"{name}={port} is not a TCP port (1-65535)")
    return port


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise SettingsError(f"{name}={raw!r} must be positive")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name}={raw!r}: use 1/0, true/false, yes/no or on/off")
