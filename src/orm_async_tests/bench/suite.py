"""The whole benchmark: seed the data, open every implementation, run every cell, clean up.

Operation by operation and level by level, the four implementations' cells run
as a group whose timed repeats are interleaved (:func:`.runner.run_group`).
Reads come first, on freshly seeded and analysed tables, writes after them. All
four implementations stay connected for the whole run (``pool_size`` = the
highest concurrency: 4 pools of at most ``MAX_CONCURRENCY`` connections).
"""

from __future__ import annotations

import gc
import os
import platform
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from sqlalchemy import text

from ..db import Database
from ..errors import SetupError
from . import (
    MAX_CONCURRENCY,
    impl_asyncpg,
    impl_piccolo,
    impl_psycopg,
    impl_sqlalchemy_best,
    impl_sqlalchemy_naive,
    impl_sqlalchemy_orm,
    impl_tortoise,
)
from .cases import Environment, Implementation
from .dataset import QUICK_SIZES, Dataset, Sizes
from .load import MachineLoad
from .operations import OPERATIONS, Operation
from .runner import FULL_PLAN, QUICK_PLAN, Cell, Plan, Progress, run_group

SQLALCHEMY: tuple[Implementation[Any], ...] = (
    impl_sqlalchemy_naive.IMPL,
    impl_sqlalchemy_best.IMPL,
    impl_sqlalchemy_orm.IMPL,
)
IMPLEMENTATIONS: tuple[Implementation[Any], ...] = (
    impl_asyncpg.IMPL,
    impl_psycopg.IMPL,
    *SQLALCHEMY,
    *(impl.twin("psycopg") for impl in SQLALCHEMY),
    impl_tortoise.IMPL,
    impl_piccolo.IMPL,
)
DEFAULT_CONCURRENCY = (1, 10)


@dataclass
class BenchRun:
    """Everything a run measured, and what it ran on (one event loop, or several merged)."""

    meta: dict[str, Any]
    cells: list[Cell] = field(default_factory=list)

    @property
    def failed(self) -> list[Cell]:
        return [c for c in self.cells if c.error is not None]

    def cell(
        self, operation: str, implementation: str, concurrency: int, loop: str = "asyncio"
    ) -> Cell | None:
        for c in self.cells:
            key = (c.operation, c.implementation, c.concurrency, c.loop)
            if key == (operation, implementation, concurrency, loop):
                return c
        return None

    @property
    def concurrency(self) -> list[int]:
        return list(self.meta["concurrency"])

    @property
    def loops(self) -> list[str]:
        return list(self.meta["loops"])


def from_json(data: dict[str, Any]) -> BenchRun:
    """The run a ``bench.json`` holds (its samples), to render again."""
    names = {f.name for f in fields(Cell)}
    return BenchRun(
        data["meta"], [Cell(**{k: v for k, v in c.items() if k in names}) for c in data["cells"]]
    )


def merged(runs: Sequence[BenchRun]) -> BenchRun:
    """One run of several event loops' runs (the same operations, implementations, levels)."""
    first = runs[0]
    meta = dict(first.meta)
    meta["loops"] = [loop for run in runs for loop in run.loops]
    meta["per_loop"] = {loop: run.meta["per_loop"][loop] for run in runs for loop in run.loops}
    meta["seconds"] = round(sum(run.meta["seconds"] for run in runs), 1)
    return BenchRun(meta, [cell for run in runs for cell in run.cells])


def _versions() -> dict[str, str]:
    names = ("sqlalchemy", "asyncpg", "psycopg", "tortoise-orm", "piccolo", "uvloop")
    found = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def chosen(
    operations: Sequence[str] | None, implementations: Sequence[str] | None
) -> tuple[dict[str, Operation], tuple[Implementation[Any], ...]]:
    """The operations and implementations a run is asked for (all when ``None``)."""
    ops = dict(OPERATIONS)
    impls = IMPLEMENTATIONS
    if operations:
        unknown = sorted(set(operations) - set(OPERATIONS))
        if unknown:
            raise BenchSetupError(
                f"no operation {', '.join(unknown)}: one of {', '.join(OPERATIONS)}"
            )
        ops = {k: v for k, v in OPERATIONS.items() if k in operations}
    if implementations:
        keys = [i.key for i in IMPLEMENTATIONS]
        unknown = sorted(set(implementations) - set(keys))
        if unknown:
            raise BenchSetupError(
                f"no implementation {', '.join(unknown)}: one of {', '.join(keys)}"
            )
        impls = tuple(i for i in IMPLEMENTATIONS if i.key in implementations)
    return ops, impls


class BenchSetupError(SetupError):
    """The run cannot start as asked (an unknown operation, too few server connections)."""


async def check_connections(db: Database, needed: int) -> None:
    """Fail with one line when the server cannot give ``needed`` more connections."""
    async with db.engine.connect() as conn:
        allowed, used, reserved = (
            await conn.execute(
                text(
                    "SELECT current_setting('max_connections')::int, "
                    "(SELECT count(*) FROM pg_stat_activity "
                    "WHERE backend_type = 'client backend'), "
                    "current_setting('superuser_reserved_connections')::int"
                )
            )
        ).one()
    free = allowed - reserved - used
    if needed > free:
        raise BenchSetupError(
            f"the run needs {needed} connections (one pool per implementation, each the "
            f"highest --concurrency), the server has {free} free of max_connections={allowed}: "
            "fewer --implementations, a lower --concurrency, or a server with more"
        )


@asynccontextmanager
async def connected(
    data: Dataset, impls: Sequence[Implementation[Any]], env: Environment, *, writers: int
) -> AsyncIterator[None]:
    """Seed ``data``, open every implementation, then keep what lives for the whole run
    (modules, models, the data set) out of the collections the runner starts before each
    timed run (~0.1 s each); undone in reverse however the block ends."""
    opened: list[Implementation[Any]] = []
    try:
        await data.seed(writers=writers)
        for impl in impls:
            opened.append(impl)
            await impl.open(env)
        gc.collect()
        gc.freeze()
        yield
    finally:
        gc.unfreeze()
        try:
            for impl in reversed(opened):
                await impl.close()
        finally:
            await data.drop()


async def run_bench(
    db: Database,
    *,
    quick: bool = False,
    concurrency: Sequence[int] = DEFAULT_CONCURRENCY,
    progress: Progress | None = None,
    sizes: Sizes | None = None,
    plan: Plan | None = None,
    loop: str = "asyncio",
    operations: Sequence[str] | None = None,
    implementations: Sequence[str] | None = None,
) -> BenchRun:
    """Run every cell on ``db``'s server (on the running event loop, named ``loop``);
    the data it creates are gone when it returns."""
    levels = sorted(set(concurrency))
    if not levels or levels[0] < 1 or levels[-1] > MAX_CONCURRENCY:
        raise ValueError(f"concurrency levels must be between 1 and {MAX_CONCURRENCY}")
    ops, impls = chosen(operations, implementations)
    sizes = sizes or (QUICK_SIZES if quick else Sizes())
    plan = plan or (QUICK_PLAN if quick else FULL_PLAN)
    env = Environment(db, pool_size=levels[-1])
    await check_connections(db, env.pool_size * len(impls))
    data = Dataset(db, sizes)
    load = MachineLoad.start()
    run = BenchRun(
        meta={
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "quick": quick,
            "concurrency": levels,
            "loops": [loop],
            "database": db.describe(),
            "postgresql": await db.server_version(),
            "versions": _versions(),
            "cpus": os.cpu_count(),
            "machine": f"{platform.system()} {platform.machine()}",
            "sizes": asdict(sizes),
            "plan": asdict(plan),
            "operations": {
                key: {"title": op.title, "group": op.group, "one_op": op.describe(data)}
                for key, op in ops.items()
            },
            "implementations": {impl.key: impl.label for impl in impls},
            "patterns": {
                impl.key: {op: case.pattern for op, case in impl.cases.items() if op in ops}
                for impl in impls
            },
        }
    )
    async with connected(data, impls, env, writers=levels[-1]):
        for op in ops.values():
            for level in levels:
                if progress is not None:
                    progress(f"{op.title} · concurrency {level} · {loop}")
                run.cells += await run_group(impls, op, level, data, plan, loop)
    seconds = round(load.seconds(), 1)
    run.meta["seconds"] = seconds
    run.meta["per_loop"] = {loop: {"seconds": seconds, "load": load.stop()}}
    return run


def group_count(
    concurrency: Sequence[int], loops: int = 1, operations: Sequence[str] | None = None
) -> int:
    """Groups of cells a run times (one per operation, concurrency level and loop)."""
    return len(chosen(operations, None)[0]) * len(set(concurrency)) * loops
