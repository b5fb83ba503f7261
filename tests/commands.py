"""Run the project's console scripts in a subprocess, as a user would."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from orm_async_tests.lab.env import environment

SCRIPTS = Path(sys.executable).parent


@dataclass
class Ran:
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


def run_command(
    command: str, *args: str, env: dict[str, str | None] | None = None, timeout: float = 120
) -> Ran:
    """Run one of the project's console scripts (``test1``, ``alembic``, ...) as a user would.

    ``env`` entries override the current environment; ``None`` removes a variable.
    """
    done = subprocess.run(
        [str(SCRIPTS / command), *args],
        env=environment(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=Path(__file__).resolve().parent.parent,
        check=False,
    )
    return Ran(done.returncode, done.stdout, done.stderr)


def servers_under(directory: Path) -> list[int]:
    """Pids of the PostgreSQL servers (postmasters) whose data directory is in ``directory``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(b"/postgres") and any(
            arg.startswith(str(directory).encode()) for arg in argv[1:]
        ):
            found.append(int(proc.name))
    return found
