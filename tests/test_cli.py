"""The command line as users run it: `orm-async-tests`, `testN`, and the embedded default."""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
from pathlib import Path

from orm_async_tests.cli import discover
from orm_async_tests.db import Database

from .commands import SCRIPTS, run_command


def test_list_names_every_experiment() -> None:
    ran = run_command("orm-async-tests", "list")
    assert ran.code == 0, ran.text
    for exp in discover().values():
        assert exp.name in ran.out
        assert exp.title in ran.out


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
    assert "verdict" in ran.out
    assert "PASSED:" in ran.out
    assert "users=40" in ran.out


async def test_run_all_on_a_fresh_embedded_default() -> None:
    """No DATABASE_URL, an empty data directory: started, migrated, every experiment green;
    a second run reuses the database without migrating again."""
    data_dir = Path(tempfile.mkdtemp(prefix="oat-default-")) / "pgdata"
    env: dict[str, str | None] = {
        "DATABASE_URL": None,
        "DB_SCHEMA": None,
        "EMBEDDED_PGDATA": str(data_dir),
    }
    first = await asyncio.to_thread(run_command, "orm-async-tests", "run", "--all", env=env)
    assert first.code == 0, first.text
    assert "migrated the embedded database from empty to" in first.out
    assert f"embedded PostgreSQL in {data_dir}" in first.out
    again = await asyncio.to_thread(run_command, "test3", env=env)
    assert again.code == 0, again.text
    assert "migrated" not in again.out
