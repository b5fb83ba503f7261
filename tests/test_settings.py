"""Settings and URL rules: pure functions, no database."""

from __future__ import annotations

from pathlib import Path

import pytest

from orm_async_tests.settings import Settings, SettingsError, normalize_url, redacted, with_driver


@pytest.mark.parametrize(
    ("raw", "driver", "expected"),
    [
        ("postgresql://u:pw@db:5432/app", "asyncpg", "postgresql+asyncpg://u:***@db:5432/app"),
        ("postgres://u@db/app", "asyncpg", "postgresql+asyncpg://u@db/app"),
        ("postgresql://u@db/app", "psycopg", "postgresql+psycopg://u@db/app"),
        ("postgresql+asyncpg://u@db/app", "psycopg", "postgresql+asyncpg://u@db/app"),
        ("postgresql+psycopg://u@db/app", "asyncpg", "postgresql+psycopg://u@db/app"),
        (
            "postgresql://postgres@/postgres?host=/tmp/sock",
            "asyncpg",
            "postgresql+asyncpg://postgres@/postgres?host=%2Ftmp%2Fsock",
        ),
    ],
)
def test_urls_become_async_postgresql_urls(raw: str, driver: str, expected: str) -> None:
    assert redacted(normalize_url(raw, driver)) == expected


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("not a url", "is not a valid URL"),
        ("postgresql://u:s3cret@db:port/app", "port is not a number"),
        ("postgresql://u:s3cret@db:70000/app", "out of range"),
        ("mysql://u:s3cret@db/app", "needs PostgreSQL"),
        ("postgresql+psycopg2://u:s3cret@db/app", "sync driver"),
        ("postgresql+nope://u:s3cret@db/app", "unknown driver"),
        ("postgresql://u:s3cret@db", "names no database"),
    ],
)
def test_bad_urls_are_refused_with_a_reason_and_no_password(raw: str, says: str) -> None:
    with pytest.raises(SettingsError) as caught:
        normalize_url(raw)
    assert says in str(caught.value)
    assert "s3cret" not in str(caught.value)


def test_defaults_without_environment() -> None:
    settings = Settings.from_env({})
    assert settings.database_url is None
    assert (settings.driver, settings.pool_size, settings.max_overflow) == ("asyncpg", 5, 10)
    assert settings.pool_pre_ping is True
    assert settings.schema is None


def test_environment_is_read() -> None:
    settings = Settings.from_env(
        {
            "DATABASE_URL": "postgresql://u@db/app",
            "DB_DRIVER": "psycopg",
            "DB_POOL_SIZE": "2",
            "DB_MAX_OVERFLOW": "0",
            "DB_POOL_TIMEOUT": "1.5",
            "DB_PRE_PING": "off",
            "DB_ECHO": "yes",
            "DB_CONNECT_TIMEOUT": "2",
            "DB_SCHEMA": "exp_1",
            "EMBEDDED_PGDATA": "~/pg",
        }
    )
    assert settings.database_url is not None
    assert settings.database_url.drivername == "postgresql+psycopg"
    assert settings.driver == "psycopg"
    assert (settings.pool_size, settings.max_overflow, settings.pool_timeout) == (2, 0, 1.5)
    assert (settings.pool_pre_ping, settings.echo, settings.connect_timeout) == (False, True, 2.0)
    assert settings.schema == "exp_1"
    assert settings.embedded_data_dir == Path("~/pg").expanduser()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DB_POOL_SIZE", "five"),
        ("DB_POOL_SIZE", "-1"),
        ("DB_POOL_TIMEOUT", "0"),
        ("DB_PRE_PING", "maybe"),
        ("DB_DRIVER", "psycopg2"),
        ("DB_SCHEMA", "x; drop table users"),
        ("API_PORT", "70000"),
        ("API_PORT", "http"),
    ],
)
def test_bad_settings_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})


def test_with_driver_keeps_the_server() -> None:
    url = normalize_url("postgresql://u:pw@db:6543/app")
    other = with_driver(url, "psycopg")
    assert (other.drivername, other.host, other.port, other.password) == (
        "postgresql+psycopg",
        "db",
        6543,
        "pw",
    )


def test_pgbouncer_url_is_read_and_checked() -> None:
    settings = Settings.from_env({"PGBOUNCER_URL": "postgresql://postgres@127.0.0.1:6432/test"})
    assert settings.pgbouncer_url is not None
    assert settings.pgbouncer_url.drivername == "postgresql+asyncpg"
    with pytest.raises(SettingsError, match="PGBOUNCER_URL names a 'mysql' database"):
        Settings.from_env({"PGBOUNCER_URL": "mysql://u@h/d"})
