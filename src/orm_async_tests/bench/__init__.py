"""Benchmarks: async SQLAlchemy beside raw asyncpg and psycopg, Tortoise and Piccolo, same
server, same rows.

``orm-async-tests bench`` (or ``nox -s bench``) runs every operation of
:mod:`.operations` with every implementation, at each concurrency level:

- :mod:`.impl_asyncpg` — raw asyncpg, the limit (prepared statements, ``unnest``
  arrays, ``copy_records_to_table``);
- :mod:`.impl_psycopg` — raw psycopg 3, the other driver's limit (prepared
  statements, binary results, ``unnest`` arrays, binary COPY);
- :mod:`.impl_sqlalchemy_naive` — the async ORM as the tutorials write it;
- :mod:`.impl_sqlalchemy_best` — the fastest correct SQLAlchemy Core pattern we
  found for each operation, each docstring saying why it wins;
- :mod:`.impl_sqlalchemy_orm` — the fastest correct SQLAlchemy ORM pattern (ORM
  objects out, the session's API in); the three SQLAlchemy columns run on
  asyncpg and again on psycopg (``Implementation.twin``);
- :mod:`.impl_tortoise` — Tortoise ORM's idiomatic fastest pattern, on models
  that map the same tables (:mod:`.tortoise_models`);
- :mod:`.impl_piccolo` — Piccolo ORM's, on tables that map the same tables
  (:mod:`.piccolo_tables`).

Each benchmarked case is a short function registered with ``@IMPL.case(...)``
(after SQLAlchemy's ``examples/performance``); its docstring names the pattern.
:mod:`.runner` checks every cell's results once, then times it;
:mod:`.stats`, :mod:`.report` and :mod:`.plots` turn the samples into medians,
ratios, a JSON file, a Markdown table and bar charts; :mod:`.command` is the
``bench`` subcommand.

Tortoise, Piccolo, matplotlib and rich come from the optional Poetry group ``bench``;
this module imports none of them, so the CLI can say how to install them.
"""

from __future__ import annotations

from importlib.util import find_spec

BENCH_MODULES = ("tortoise", "piccolo", "matplotlib", "rich")
MAX_CONCURRENCY = 16
"""Highest ``--concurrency``. Each implementation keeps a pool of the highest level, so
ten pools of 10 need 100 connections: the embedded server allows 250, a server with
PostgreSQL's default of 100 needs fewer ``--implementations`` or a lower level (the run
says so before it starts)."""
INSTALL_HINT = (
    "the benchmark needs the optional `bench` dependency group: "
    "install it with `poetry install --with bench`"
)


def missing_modules() -> list[str]:
    """The bench group's top-level modules that cannot be imported here."""
    return [name for name in BENCH_MODULES if find_spec(name) is None]
