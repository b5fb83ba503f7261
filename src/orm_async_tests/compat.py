"""What differs between the SQLAlchemy lines this project runs on (2.0.x and 2.1.x).

Experiments never test ``sqlalchemy.__version__`` themselves: they use the names
below, and a check whose expectation differs by line says so with
``on(sa20=..., sa21=...)`` (see :mod:`.lab.cells`).

- ``await_``: the function that awaits from inside SQLAlchemy's greenlet
  (``sqlalchemy.util.await_`` in 2.1, ``await_only`` in 2.0), and its name as
  the ``MissingGreenlet`` message spells it (``"can't call await_() here"`` vs
  ``"can't call await_only() here"``);
- :func:`driver_exception`: the driver's own exception behind a ``DBAPIError``
  (2.1 has ``DBAPIError.driver_exception``; in 2.0 it is the ``__cause__`` of the
  adapter's exception in ``.orig``);
- :func:`error_text`: a driver error's message without the ``<class '...'>:``
  prefix that 2.0's asyncpg adapter puts in front of it;
- :data:`DEFAULT_POSTGRESQL_DRIVER`: what plain ``postgresql://`` means
  (``psycopg`` in 2.1, ``psycopg2`` in 2.0).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

import sqlalchemy
from sqlalchemy import util
from sqlalchemy.engine import make_url

T = TypeVar("T")

VERSION = sqlalchemy.__version__
LINE = ".".join(VERSION.split(".")[:2])
"""``"2.0"`` or ``"2.1"``."""

AWAIT_NAME = "await_" if hasattr(util, "await_") else "await_only"
await_: Callable[[Any], Any] = getattr(util, AWAIT_NAME)

DEFAULT_POSTGRESQL_DRIVER = str(make_url("postgresql://h/db").get_dialect().driver)


def driver_exception(exc: BaseException) -> BaseException | None:
    """The driver's exception (asyncpg's ``QueryCanceledError``, psycopg's
    ``errors.QueryCanceled``) behind a ``DBAPIError``; ``None`` when ``exc`` wraps none."""
    orig = getattr(exc, "orig", None)
    if not isinstance(orig, BaseException):
        return None
    try:
        found = getattr(exc, "driver_exception", None)  # 2.1
    except ValueError:  # 2.1 raises it when the adapter's error has no driver exception
        found = None  # (asyncpg dialect's InvalidCachedStatementError): as in 2.0
    if isinstance(found, BaseException):
        return found
    cause = orig.__cause__  # 2.0: the adapter raised its error "from" the driver's
    return cause if cause is not None else orig


_CLASS_PREFIX = re.compile(r"<class '[\w.]+'>: ")


def error_text(message: str) -> str:
    """A driver error's message as 2.1 writes it (2.0's asyncpg adapter prefixes it with
    the driver exception's class)."""
    return _CLASS_PREFIX.sub("", message, count=1)
