"""The command line as users run it: `orm-async-tests`, `testN`, and the embedded default."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from orm_async_tests.db import Database
from orm_async_tests.lab.catalogue import catalogue
from orm_async_tests.lab.scripts import use_driver

from .commands import SCRIPTS, run_command, servers_under


def test_list_names_every_experiment_and_scenario() -> None:
    ran = run_command("orm-async-tests", "list")
    assert ran.code == 0, ran.text
    for entry in catalogue().values():
        assert f"{entry.name} " in ran.out
        assert entry.title in ran.out
        for name, _ in entry.scenarios:
            assert f"- {name}\n" in ran.out


def test_help_and_list_import_no_sqlalchemy() -> None:
    """`testN --help` and `list` read the experiments' sources: nothing heavy is imported
    (what keeps them fast; measured, never timed, here)."""
    code = (
        "import sys, contextlib, io\n"
        "from orm_async_tests import cli\n"
        "from orm_async_tests.lab.scripts import run_script\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    cli.main(['list'])\n"
        "    for entry in cli.catalogue().values():\n"
        "        try:\n"
        "            getattr(cli, entry.name)\n"
        "            run_script(entry.number, ['--help'])\n"
        "        except SystemExit:\n"
        "            pass\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('sqlalchemy', 'fastapi', 'httpx', 'alembic', 'asyncpg'))\n"
        "print(heavy)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_script_options_come_from_the_sizes() -> None:
    helped = run_command("test1", "--help")
    assert helped.code == 0, helped.text
    assert "--users INT" in helped.out
    assert "Users the loader inserts." in helped.out
    for name, _ in catalogue()[1].scenarios:
        assert name in helped.out
    wrong = run_command("test1", "--users", "many")
    assert wrong.code == 2
    assert "invalid int value" in wrong.err
    unknown = run_command("test1", "--only", "nope")
    assert unknown.code == 2
    assert "invalid choice" in unknown.err


def test_sizes_that_do_not_fit_are_one_line() -> None:
    ran = run_command("test1", "--users", "10", "--batch", "20")
    assert ran.code == 2, ran.text
    assert ran.err.strip().splitlines() == [
        "error: test1: users (10) must be more than batch (20): with one batch the reader "
        "cannot commit before the loader is done"
    ]


def test_a_reader_that_leaves_early_gets_no_traceback() -> None:
    """`orm-async-tests list | head -1`: the pipe closes before the output is written."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [str(SCRIPTS / "orm-async-tests"), "list"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (141, "")


def test_run_needs_numbers_or_all() -> None:
    assert run_command("orm-async-tests", "run").code == 2
    unknown = run_command("orm-async-tests", "run", "999")
    assert unknown.code == 2
    assert "no experiment 999" in unknown.err


async def test_script_prints_a_findings_table(database: Database) -> None:
    """`poetry run test1` in the run's migrated schema (`database`: on an external server
    nothing migrates it for the child process)."""
    ran = await asyncio.to_thread(run_command, "test1", "--users", "40", "--batch", "10")
    assert ran.code == 0, ran.text
    assert "Question:" in ran.out
    assert "── 1. one session per task" in ran.out
    assert "verdict" in ran.out
    assert "PASSED:" in ran.out
    assert "users=40" in ran.out


async def test_driver_option_runs_on_psycopg(database: Database) -> None:
    """`--driver psycopg` wins over the URL's scheme and DB_DRIVER; the report names it."""
    env: dict[str, str | None] = {"DB_DRIVER": "asyncpg"}
    url = os.environ.get("DATABASE_URL")
    if url:
        env["DATABASE_URL"] = url.replace("postgresql://", "postgresql+asyncpg://", 1)
    ran = await asyncio.to_thread(
        run_command,
        "test1",
        "--driver",
        "psycopg",
        "--only",
        "one_session_per_task",
        "--users",
        "40",
        "--batch",
        "10",
        env=env,
    )
    assert ran.code == 0, ran.text
    shown = " ".join(ran.out.split("Database:")[1].split("Sizes:")[0].split())
    assert "· psycopg 3." in shown
    assert "asyncpg" not in shown


def test_use_driver_rewrites_only_an_async_driver_of_the_url(monkeypatch: Any) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql+asyncpg://u:secret@h/db")
    use_driver("psycopg")
    assert (os.environ["DATABASE_URL"], os.environ["DB_DRIVER"]) == (
        "postgresql+psycopg://u:secret@h/db",
        "psycopg",
    )
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg2://h/db")
    use_driver("asyncpg")
    assert os.environ["DATABASE_URL"] == "postgresql+psycopg2://h/db"  # refused later, by name
    monkeypatch.delenv("DATABASE_URL")
    use_driver("asyncpg")
    assert "DATABASE_URL" not in os.environ


async def test_a_fresh_embedded_default_is_started_and_migrated_once() -> None:
    """No DATABASE_URL, an empty data directory: started, migrated, the experiment green;
    the next command reuses the database without migrating again, and the server stops
    when the last command using it exits."""
    data_dir = Path(tempfile.mkdtemp(prefix="oat-default-")) / "pgdata"
    env: dict[str, str | None] = {
        "DATABASE_URL": None,
        "DB_SCHEMA": None,
        "EMBEDDED_PGDATA": str(data_dir),
    }
    try:
        first = await asyncio.to_thread(run_command, "orm-async-tests", "run", "3", env=env)
        assert first.code == 0, first.text
        assert "migrated the embedded database from empty to" in first.out
        assert f"embedded PostgreSQL in {data_dir}" in first.out
        again = await asyncio.to_thread(
            run_command, "test1", "--users", "40", "--batch", "10", env=env
        )
        assert again.code == 0, again.text
        assert "migrated" not in again.out
        assert servers_under(data_dir) == [], "the server outlived the last command using it"
    finally:
        shutil.rmtree(data_dir.parent, ignore_errors=True)
