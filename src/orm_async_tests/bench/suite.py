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
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from typing import Any

from ..db import Database
from . import (
    MAX_CONCURRENCY,
    impl_asyncpg,
    impl_sqlalchemy_best,
    impl_sqlalchemy_naive,
    impl_tortoise,
)
from .cases import Environment, Implementation
from .dataset import QUICK_SIZES, Dataset, Sizes
from .operations import OPERATIONS
from .runner import FULL_PLAN, QUICK_PLAN, Cell, Plan, Progress, run_group

IMPLEMENTATIONS: tuple[Implementation[Any], ...] = (
    impl_asyncpg.IMPL,
    impl_sqlalchemy_naive.IMPL,
    impl_sqlalchemy_best.IMPL,
    impl_tortoise.IMPL,
)
DEFAULT_CONCURRENCY = (1, 10)


@dataclass
class BenchRun:
    """Everything a run measured, and what it ran on."""

    meta: dict[str, Any]
    cells: list[Cell] = field(default_factory=list)

    @property
    def failed(self) -> list[Cell]:
        return [c for c in self.cells if c.error is not None]

    def cell(self, operation: str, implementation: str, concurrency: int) -> Cell | None:
        for c in self.cells:
            key = (c.operation, c.implementation, c.concurrency)
            if key == (operation, implementation, concurrency):
                return c
        return None

    @property
    def concurrency(self) -> list[int]:
        return list(self.meta["concurrency"])


def _versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        **{name: version(name) for name in ("sqlalchemy", "asyncpg", "tortoise-orm")},
    }


async def run_bench(
    db: Database,
    *,
    quick: bool = False,
    concurrency: Sequence[int] = DEFAULT_CONCURRENCY,
    progress: Progress | None = None,
    sizes: Sizes | None = None,
    plan: Plan | None = None,
) -> BenchRun:
    """Run every cell on ``db``'s server; the data it creates are gone when it returns."""
    levels = sorted(set(concurrency))
    if not levels or levels[0] < 1 or levels[-1] > MAX_CONCURRENCY:
        raise ValueError(f"concurrency levels must be between 1 and {MAX_CONCURRENCY}")
    sizes = sizes or (QUICK_SIZES if quick else Sizes())
    plan = plan or (QUICK_PLAN if quick else FULL_PLAN)
    env = Environment(db, pool_size=levels[-1])
    data = Dataset(db, sizes)
    started = time.perf_counter()
    run = BenchRun(
        meta={
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "quick": quick,
            "concurrency": levels,
            "database": db.describe(),
            "postgresql": await db.server_version(),
            "versions": _versions(),
            "cpus": os.cpu_count(),
            "machine": f"{platform.system()} {platform.machine()}",
            "sizes": asdict(sizes),
            "plan": asdict(plan),
            "operations": {
                key: {"title": op.title, "group": op.group, "one_op": op.describe(data)}
                for key, op in OPERATIONS.items()
            },
            "implementations": {impl.key: impl.label for impl in IMPLEMENTATIONS},
            "patterns": {
                impl.key: {op: case.pattern for op, case in impl.cases.items()}
                for impl in IMPLEMENTATIONS
            },
        }
    )
    opened: list[Implementation[Any]] = []
    try:
        await data.seed(writers=levels[-1])
        for impl in IMPLEMENTATIONS:
            opened.append(impl)
            await impl.open(env)
        # what exists now (modules, models, the data set) lives for the whole run: keep it
        # out of the collections the runner starts before each timed run (~0.1 s each)
        gc.collect()
        gc.freeze()
        for op in OPERATIONS.values():
            for level in levels:
                if progress is not None:
                    progress(f"{op.title} · concurrency {level}")
                run.cells += await run_group(IMPLEMENTATIONS, op, level, data, plan)
    finally:
        gc.unfreeze()
        try:
            for impl in reversed(opened):
                await impl.close()
        finally:
            await data.drop()
    run.meta["seconds"] = round(time.perf_counter() - started, 1)
    return run


def group_count(concurrency: Sequence[int]) -> int:
    """Groups of cells a run times (one per operation and concurrency level)."""
    return len(OPERATIONS) * len(set(concurrency))
