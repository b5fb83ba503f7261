"""Functions the child-process tests run in a child (importable as ``tests.child_functions``)."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator


def noisy_items(n: int) -> Iterator[int]:
    """Yields 0..n-1, printing around them without ending its lines; then dies by SIGABRT."""
    for i in range(n):
        sys.stdout.write(f"noise {i} ")
        sys.stdout.flush()
        yield i
    os.kill(os.getpid(), signal.SIGABRT)


async def doubled(x: int) -> int:
    return x * 2


def raises() -> None:
    raise RuntimeError("no\nmore")


def exits() -> None:
    sys.exit(3)


def sleeps() -> None:
    import time

    time.sleep(60)
