"""Stops a throw-away embedded PostgreSQL once the process that owns it is gone.

The test suite's server lives in a temporary directory (``oat-pg-*/pgdata``). The suite
stops it and removes the directory at its end; this watcher is for every other way a
run can end: SIGTERM from nox or a CI runner, pytest-timeout's ``os._exit``, SIGKILL,
a crash. :func:`start` launches it in a session of its own (a signal to the run's
process group does not reach it); it polls the owner's pid and, once that is gone,
stops the server (fast shutdown, then immediate, then SIGKILL) and removes the
directory. Run as ``python -m orm_async_tests.reaper OWNER_PID DATA_DIR``.

Standard library only, so it starts fast and cannot fail on an import.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

POLL = 0.2
"""Seconds between two looks at the owner."""
GRACE = 10.0
"""Seconds each shutdown signal gets before the next, stronger one."""


def start(owner: int, data_dir: Path) -> None:
    """Watch ``owner``; when it is gone, stop the server in ``data_dir`` and remove it.

    The process started here forks the watcher and exits at once, so the caller keeps
    no child process (nothing to reap, no "still running" warning)."""
    launcher = subprocess.Popen(
        [sys.executable, "-m", "orm_async_tests.reaper", str(owner), str(data_dir)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )
    launcher.wait(timeout=30)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return _not_a_zombie(pid)


def _not_a_zombie(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return True  # no /proc: trust kill(0)
    return fields[0] != "Z"


def postmaster_pid(data_dir: Path) -> int | None:
    """The server's pid from ``postmaster.pid``, or ``None`` when it does not run."""
    try:
        first = (data_dir / "postmaster.pid").read_text().splitlines()[0]
        pid = int(first)
    except (OSError, ValueError, IndexError):
        return None
    return pid if alive(pid) else None


def stop(data_dir: Path) -> bool:
    """Stop the server in ``data_dir``: SIGINT (fast shutdown), SIGQUIT (immediate), then
    SIGKILL, each after ``GRACE`` seconds. Whether it is down."""
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGKILL):
        pid = postmaster_pid(data_dir)
        if pid is None:
            return True
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + GRACE
        while time.monotonic() < deadline and alive(pid):
            time.sleep(0.05)
    return postmaster_pid(data_dir) is None


def remove(data_dir: Path) -> None:
    """The data directory, and its parent when nothing else is in it (``oat-pg-*``)."""
    shutil.rmtree(data_dir, ignore_errors=True)
    with contextlib.suppress(OSError):  # not empty (not ours to remove), or gone
        data_dir.parent.rmdir()


def main(argv: list[str]) -> int:
    owner, data_dir = int(argv[0]), Path(argv[1])
    if os.fork() > 0:  # the launcher returns to start(); the watcher goes on alone
        os._exit(0)
    while alive(owner):
        time.sleep(POLL)
    if stop(data_dir):
        remove(data_dir)
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
