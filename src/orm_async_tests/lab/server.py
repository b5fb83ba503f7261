"""A server in a child process: start it, wait until it answers, stop it.

Experiment 14 and the API tests run a real uvicorn this way, so the server and
its clients never share an event loop::

    async with serving(uvicorn_command("pkg.module:make_app", port), port=port,
                       env=env, log=tmp / "api.log") as server:
        async with server.client() as http:
            await http.get("/users/1")
    server.returncode      # -15: uvicorn re-raises the SIGTERM it shut down on

Readiness is a ``GET`` of ``ready`` answering 200, bounded in time; a server
that exits first is reported with the last lines of its log. Stopping sends
SIGTERM (a graceful shutdown: the app's lifespan exit runs), then SIGKILL
after a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx


class ServerDidNotStart(RuntimeError):
    """The child server exited or stayed silent; the message has its log's last lines."""


@dataclass
class ChildServer:
    name: str
    port: int
    proc: asyncio.subprocess.Process
    log: Path
    started_in: float = 0.0
    """Seconds from the start until ``ready`` answered 200."""
    returncode: int | None = None
    """How the process ended, once :meth:`stop` returned."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **options: Any) -> httpx.AsyncClient:
        """An ``httpx.AsyncClient`` on this server (30 s timeout unless given)."""
        options.setdefault("timeout", httpx.Timeout(30.0))
        return httpx.AsyncClient(base_url=self.url, **options)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    async def stop(self, within: float = 20.0) -> int:
        """SIGTERM, wait up to ``within`` seconds, then SIGKILL; the return code."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(within):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        assert self.proc.returncode is not None
        self.returncode = self.proc.returncode
        return self.returncode


def uvicorn_command(app: str, port: int, *, factory: bool = True, graceful: int = 10) -> list[str]:
    """``python -m uvicorn app`` on 127.0.0.1:``port``, no access log."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        app,
        *(["--factory"] if factory else []),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-access-log",
        "--log-level",
        "info",
        "--timeout-graceful-shutdown",
        str(graceful),
    ]


async def start(
    command: Sequence[str],
    *,
    port: int,
    env: Mapping[str, str],
    log: Path,
    name: str = "server",
    ready: str = "/health",
    within: float = 60.0,
) -> ChildServer:
    """Start ``command`` (output into ``log``) and wait until ``GET ready`` is 200."""
    started = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *command,
            env=dict(env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )
    server = ChildServer(name, port, proc, log)
    try:
        await _wait_ready(server, ready, started + within)
    except BaseException:
        await server.stop()
        raise
    server.started_in = time.perf_counter() - started
    return server


@asynccontextmanager
async def serving(command: Sequence[str], **options: Any) -> AsyncIterator[ChildServer]:
    """:func:`start` (same options), then :meth:`ChildServer.stop` when the block ends (if
    the server is still running)."""
    server = await start(command, **options)
    try:
        yield server
    finally:
        await server.stop()


async def _wait_ready(server: ChildServer, ready: str, deadline: float) -> None:
    async with server.client(timeout=httpx.Timeout(2.0)) as client:
        while True:
            if server.proc.returncode is not None:
                tail = server.log_text().strip().splitlines()[-5:]
                raise ServerDidNotStart(
                    f"the {server.name} server exited with {server.proc.returncode}: "
                    + " | ".join(tail)
                )
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(ready)).status_code == 200:
                    return
            if time.perf_counter() > deadline:
                raise ServerDidNotStart(f"the {server.name} server did not answer {ready} in time")
            await asyncio.sleep(0.05)
