"""The suite's throw-away PostgreSQL does not outlive the run, whichever way the run ends.

A small suite (one test that uses the database) runs in a child pytest whose ``TMPDIR``
is a directory of this test's own, so the child's ``oat-pg-*`` directory and its server
are found there: while the child runs a server must be seen, and once it has ended
(normally, or interrupted by Ctrl-C, SIGTERM or SIGKILL as soon as its server is up) no
server may run from that directory and no ``oat-pg-*`` directory may be left in it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from .commands import servers_under

ROOT = Path(__file__).resolve().parent.parent
SMALL_SUITE = "tests/test_db.py::test_embedded_server_is_reused_not_restarted"
WITHIN = 60.0
"""Seconds the child gets to start its server, and the cleanup to finish."""


def left_in(tmp: Path) -> list[str]:
    """The suite's server directories (``oat-pg-*``) still in ``tmp``."""
    return sorted(p.name for p in tmp.glob("oat-pg-*"))


def child_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "PYTEST_"))}
    for key in ("DATABASE_URL", "PGBOUNCER_URL", "EMBEDDED_PGDATA"):
        env.pop(key, None)
    return {**env, "TMPDIR": str(tmp)}


@pytest.mark.parametrize("end", ["normally", "SIGINT", "SIGTERM", "SIGKILL"])
def test_the_suites_server_is_stopped_and_removed(tmp_path: Path, end: str) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="oat-t-"))  # short: the server's socket lives in it
    basetemp = f"--basetemp={tmp_path / 'basetemp'}"
    try:
        check_the_cleanup(tmp, end, basetemp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_the_cleanup(tmp: Path, end: str, basetemp: str) -> None:
    child = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", SMALL_SUITE, basetemp],
        cwd=ROOT,
        env=child_env(tmp),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    seen: list[int] = []
    try:
        deadline = time.monotonic() + WITHIN
        while child.poll() is None and time.monotonic() < deadline:
            seen = seen or servers_under(tmp)
            if seen and end != "normally":
                child.send_signal(getattr(signal, end))
                break
            time.sleep(0.05)
        output = child.communicate(timeout=WITHIN)[0].decode(errors="replace")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert seen, f"no server was seen under {tmp} while the child ran:\n{output[-2000:]}"
    if end == "normally":
        assert child.returncode == 0, output[-2000:]
    deadline = time.monotonic() + WITHIN
    while (servers_under(tmp) or left_in(tmp)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (servers_under(tmp), left_in(tmp)) == ([], [])
