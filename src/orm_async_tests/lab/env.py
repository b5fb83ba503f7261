"""Environments and ports for child processes (standard library only)."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


def environment(overrides: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """This process's environment with ``overrides``; a ``None`` value removes the variable."""
    env = dict(os.environ)
    for key, value in (overrides or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a child server)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
