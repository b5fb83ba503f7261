"""Implementations and their cases: what the runner times.

An :class:`Implementation` owns its connections (a pool, an engine, Tortoise's
context) and hands each task one *handle* — an asyncpg connection, an
``AsyncSession``, an ``AsyncConnection`` — for all the ops of that task in one
timed run (one session or connection per task, never shared). Its cases are short
async functions registered per operation, after SQLAlchemy's
``examples/performance``::

    @IMPL.case("get_by_pk")
    async def get_by_pk(conn: AsyncConnection, user_id: int) -> Row[Any]:
        '''Core ``select(users)`` on an AUTOCOMMIT connection: ... why it is fast.'''
        return (await conn.execute(GET_USER, {"id": user_id})).one()

A case does ONE op with the handle it is given and returns what the op produced
(the check reads it; timed runs drop it at once). Its docstring's first sentence
names the pattern in the report; the rest says why it is fast and correct.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Generic, Self, TypeVar

from ..db import Database, open_database
from ..settings import with_driver

H = TypeVar("H")
CaseFn = Callable[[H, Any], Awaitable[Any]]


@dataclass(frozen=True)
class Environment:
    """What an implementation connects with: the run's database and the pool size to use."""

    db: Database
    """The project's database (settings, target); implementations open their own pools."""
    pool_size: int
    """Connections each implementation keeps: the highest concurrency of the run."""
    application_name: str = "orm-async-tests-bench"

    def open_database(self, driver: str = "asyncpg", **engine_overrides: Any) -> Database:
        """The project's engine and session factory on the run's server through ``driver``
        (``asyncpg`` or ``psycopg``), for a SQLAlchemy column: ``pool_size`` connections,
        no overflow, no pre-ping (SQLAlchemy's default; neither the raw drivers' pools nor
        Tortoise or Piccolo ping either)."""
        target = dataclasses.replace(self.db.target, url=with_driver(self.db.target.url, driver))
        return open_database(
            dataclasses.replace(self.db.settings, driver=driver),
            target=target,
            application_name=self.application_name,
            pool_size=self.pool_size,
            max_overflow=0,
            pool_pre_ping=False,
            **engine_overrides,
        )


@dataclass(frozen=True)
class Case(Generic[H]):
    implementation: str
    operation: str
    fn: CaseFn[H]

    @property
    def doc(self) -> str:
        return inspect.cleandoc(self.fn.__doc__ or "")

    @property
    def pattern(self) -> str:
        """The docstring's first sentence: what the report says this case does."""
        first = " ".join(self.doc.split("\n\n")[0].split())
        end = first.find(". ")
        return first if end < 0 else first[: end + 1]


class Implementation(ABC, Generic[H]):
    """One way of talking to PostgreSQL, with a case per operation."""

    key: str
    label: str
    """Column title in the report."""
    driver: str = "asyncpg"
    """The driver under it (a SQLAlchemy column's engine uses it: see :meth:`twin`)."""

    def __init__(self) -> None:
        self.cases: dict[str, Case[H]] = {}

    def twin(self, driver: str) -> Self:
        """The same cases on another driver, under the key ``<key>_<driver>``: one
        SQLAlchemy column's code on psycopg as well as on asyncpg."""
        other = copy.copy(self)
        other.driver = driver
        other.key = f"{self.key}_{driver}"
        other.label = f"{self.label} ({driver})"
        other.cases = {
            op: dataclasses.replace(c, implementation=other.key) for op, c in self.cases.items()
        }
        return other

    def case(self, operation: str) -> Callable[[CaseFn[H]], CaseFn[H]]:
        """Register ``fn`` as this implementation's way of doing ``operation``."""

        def register(fn: CaseFn[H]) -> CaseFn[H]:
            if operation in self.cases:
                raise ValueError(f"{self.key}: two cases for {operation}")
            if not (fn.__doc__ or "").strip():
                raise ValueError(f"{self.key}.{operation}: a case needs a docstring")
            self.cases[operation] = Case(self.key, operation, fn)
            return fn

        return register

    @abstractmethod
    async def open(self, env: Environment) -> None:
        """Connect (pools sized ``env.pool_size``); no query runs before this."""

    @abstractmethod
    def task(self) -> AbstractAsyncContextManager[H]:
        """The handle one task uses for all its ops of a run, released on exit."""

    @abstractmethod
    async def close(self) -> None:
        """Release every connection (also after a failed open)."""
