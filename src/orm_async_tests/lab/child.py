"""Run one function of an experiment in a child process; JSON comes back.

What must not happen in the experiment's own process (a second event loop on a
pooled engine, an engine never disposed, a crash) runs in a child::

    done = await child.call(lab, leak_an_engine, "app-name", within=60)
    done.value          # what leak_an_engine("app-name") returned (JSON)
    done.items          # or, for a generator, what it yielded so far
    done.ended()        # "exit 0", "killed by SIGSEGV", ...

The function is named by its module and qualified name and must be importable
at module level; its arguments and results are JSON. A coroutine function or
an async generator runs under ``asyncio.run``; a generator's items are written
as they are produced, so a child that crashes halfway still reports the items
before the crash. The child's environment is :meth:`Lab.child_env` (same
database and schema) with ``env``; a child still running after ``within``
seconds is killed and :class:`TimeoutError` raised.

The child side (``python -m orm_async_tests.lab.child REQUEST``) imports the
standard library and the function's module only.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .context import Lab

MARK = "@@orm-async-tests.child@@ "
"""Prefix of the protocol's lines on the child's stdout; any other line is the child's own."""


@dataclass(frozen=True)
class ChildRun:
    """How a child ended and what it sent back."""

    returncode: int
    items: list[Any]
    finished: bool
    """The function returned (or its generator was exhausted) and the child said so."""
    error: str | None
    """What the function raised, as ``"TypeName: message"``."""
    stdout: str
    """What the child printed that is not part of the protocol."""
    stderr: str
    seconds: float

    @property
    def value(self) -> Any:
        """The function's return value; ``ValueError`` if it did not return one."""
        if not self.finished or len(self.items) != 1:
            raise ValueError(f"the child returned no value ({self.ended()})")
        return self.items[0]

    @property
    def signal(self) -> signal.Signals | None:
        """The signal that killed the child, if one did."""
        return signal.Signals(-self.returncode) if self.returncode < 0 else None

    def ended(self) -> str:
        """``"exit 0"``, ``"killed by SIGSEGV"``."""
        killer = self.signal
        return f"killed by {killer.name}" if killer is not None else f"exit {self.returncode}"


async def call(
    lab: Lab[Any],
    function: Callable[..., Any],
    *args: Any,
    within: float,
    options: Sequence[str] = (),
    env: Mapping[str, str | None] | None = None,
) -> ChildRun:
    """``function(*args)`` in ``python [options] -m orm_async_tests.lab.child``."""
    if function.__module__ == "__main__":
        raise ValueError(f"{function.__qualname__} must live in an importable module")
    request = json.dumps(
        {"module": function.__module__, "name": function.__qualname__, "args": list(args)}
    )
    argv = [sys.executable, *options, "-m", __name__, request]
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=lab.child_env(env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # its own process group: a kill reaches what it started too
    )
    try:
        async with asyncio.timeout(within):
            out, err = await proc.communicate()
    except TimeoutError:
        raise TimeoutError(
            f"the child running {function.__qualname__} did not end within {within} s"
        ) from None
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    assert proc.returncode is not None  # communicate() returns once the child has exited
    return _parse(
        proc.returncode,
        out.decode(errors="replace"),
        err.decode(errors="replace"),
        time.perf_counter() - started,
    )


def _parse(returncode: int, stdout: str, stderr: str, seconds: float) -> ChildRun:
    items: list[Any] = []
    finished = False
    error: str | None = None
    own: list[str] = []
    for line in stdout.split("\n"):
        if not line.startswith(MARK):
            if line:
                own.append(line)
            continue
        message = json.loads(line[len(MARK) :])
        if "item" in message:
            items.append(message["item"])
        elif "error" in message:
            error = str(message["error"])
        elif message.get("done"):
            finished = True
    return ChildRun(returncode, items, finished, error, "\n".join(own), stderr, seconds)


def _send(message: dict[str, Any]) -> None:
    # a new line first: output of the child's own that did not end its line stays apart
    sys.stdout.write("\n" + MARK + json.dumps(message) + "\n")
    sys.stdout.flush()


def _serve(request: str) -> int:
    try:
        asked = json.loads(request)
        target: Any = importlib.import_module(asked["module"])
        for part in asked["name"].split("."):
            target = getattr(target, part)
        args = asked["args"]
        if inspect.isasyncgenfunction(target):

            async def drain() -> None:
                async for item in target(*args):
                    _send({"item": item})

            asyncio.run(drain())
        elif inspect.iscoroutinefunction(target):
            _send({"item": asyncio.run(target(*args))})
        elif inspect.isgeneratorfunction(target):
            for item in target(*args):
                _send({"item": item})
        else:
            _send({"item": target(*args)})
    except BaseException as exc:  # SystemExit, KeyboardInterrupt too: say what ended it
        lines = str(exc).strip().splitlines()
        message = re.sub(r"^\([\w.]+\) ", "", lines[0] if lines else "")
        _send({"error": f"{type(exc).__name__}: {message}".rstrip(": ")})
        return 1
    _send({"done": True})
    return 0


if __name__ == "__main__":
    sys.exit(_serve(sys.argv[1]))
