"""Bad input: one readable line, a non-zero exit, no traceback, no hang, no password.

Each case runs the real command line (``test3``, ``alembic``) in a subprocess.
"""

from __future__ import annotations

import asyncio
import re
import time

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from orm_async_tests.db import Target

from .commands import Ran, run_command

PASSWORD = "s3cr3t-Pa55"


def assert_one_clear_line(ran: Ran, *needles: str) -> None:
    assert ran.code != 0, ran.text
    assert "Traceback" not in ran.text, ran.text
    assert PASSWORD not in ran.text
    lines = [line for line in ran.err.splitlines() if line.strip()]
    assert len(lines) == 1, ran.err
    for needle in needles:
        assert needle in lines[0], lines[0]


def socket_url(target: Target, user: str, database: str, password: str = PASSWORD) -> str:
    """A URL for the run's server with another user, password or database."""
    url = target.url.set(username=user, password=password, database=database)
    return url.render_as_string(hide_password=False)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        (f"postgresql://me:{PASSWORD}@localhost:notaport/db", "not a valid URL"),
        (f"mysql://me:{PASSWORD}@localhost/db", "needs PostgreSQL"),
        (f"postgresql+psycopg2://me:{PASSWORD}@localhost/db", "sync driver"),
    ],
)
def test_malformed_url(url: str, says: str) -> None:
    ran = run_command("test3", env={"DATABASE_URL": url})
    assert_one_clear_line(ran, says)
    assert ran.code == 2


def test_unreachable_port_fails_fast() -> None:
    started = time.monotonic()
    ran = run_command("test3", env={"DATABASE_URL": f"postgresql://me:{PASSWORD}@127.0.0.1:1/db"})
    assert_one_clear_line(ran, "cannot reach PostgreSQL at 127.0.0.1:1", "connection refused")
    assert "docker compose up -d" in ran.err
    assert "unset DATABASE_URL" in ran.err
    assert time.monotonic() - started < 30


def test_unknown_host() -> None:
    ran = run_command(
        "test3",
        env={"DATABASE_URL": f"postgresql://me:{PASSWORD}@no-such-host.invalid/db"},
    )
    assert_one_clear_line(ran, "no-such-host.invalid")


def test_unknown_database(target: Target) -> None:
    ran = run_command("test3", env={"DATABASE_URL": socket_url(target, "postgres", "nope_db")})
    assert_one_clear_line(ran, "database 'nope_db' does not exist", "createdb nope_db")


def test_unknown_user(target: Target) -> None:
    ran = run_command("test3", env={"DATABASE_URL": socket_url(target, "nobody_here", "postgres")})
    assert_one_clear_line(ran, "refused", "nobody_here")


async def test_wrong_password(target: Target, engine: AsyncEngine) -> None:
    """Needs password auth for one role: set up on the run's own embedded server only."""
    if target.embedded is None:
        pytest.skip("the external server's authentication rules are not ours to change")
    role = "oat_password_user"
    hba = target.embedded.data_dir / "pg_hba.conf"
    rules = hba.read_text()
    if role not in rules:
        hba.write_text(f"local all {role} scram-sha-256\n" + rules)
    async with engine.begin() as conn:
        if not await conn.scalar(text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role}):
            await conn.execute(text(f"CREATE ROLE {role} LOGIN PASSWORD 'the-right-one'"))
        await conn.execute(text("SELECT pg_reload_conf()"))
    url = socket_url(target, role, "postgres")
    ran = await asyncio.to_thread(run_command, "test3", env={"DATABASE_URL": url})
    assert_one_clear_line(ran, f"authentication failed for user '{role}'")


def test_schema_not_migrated(target: Target) -> None:
    """An external server (any DATABASE_URL) with an empty schema: told to run alembic."""
    url = target.url.render_as_string(hide_password=False)
    ran = run_command("test3", env={"DATABASE_URL": url, "DB_SCHEMA": "never_migrated"})
    assert_one_clear_line(ran, "alembic upgrade head", "no migrations applied")


def test_alembic_reports_one_line_too() -> None:
    ran = run_command(
        "alembic",
        "upgrade",
        "head",
        env={"DATABASE_URL": f"postgresql://me:{PASSWORD}@127.0.0.1:1/db"},
    )
    assert ran.code != 0
    assert "Traceback" not in ran.text
    assert PASSWORD not in ran.text
    assert re.search(r"FAILED: cannot reach PostgreSQL at 127\.0\.0\.1:1", ran.out), ran.text
