"""Running the cells: check each once, warm up, then time repeats, interleaved.

A *cell* is one implementation x one operation x one concurrency level. The
cells of one operation and level (one per implementation) run as a group:

1. **check**, per cell — ``concurrency`` ops (one per task) run and their
   results, and the database after them, are checked (:meth:`Operation.check`).
   A cell that fails its check, or raises, is reported as failed and never
   timed. This run is also the first warm-up (prepared statements, compiled
   caches, pool connections).
2. **warm-up**, per cell — when the check took less than ``target`` seconds,
   one more run sized to last about half of it; it measures the time per op,
   from which the cell's op count is chosen: a timed run should last about
   ``target`` seconds (at least one op per task, at most ``max_ops``).
3. **repeats**, interleaved — ``repeats`` rounds, each timing one run of every
   cell of the group in turn, so a slow spell of a shared machine lands on all
   implementations alike instead of on the one that happened to be running. A
   sample is ``ops / seconds``.

A run of ``n`` ops at concurrency ``c`` starts ``c`` tasks together (an
``asyncio.TaskGroup``); task ``t`` takes one handle from the implementation (a
connection or a session: one per task, never shared) and does ops ``t, t+c, …``
one after the other. The clock runs from the tasks' start to the last one's
end, handle checkouts included. Inputs are made and written rows cleared
outside the clock; the garbage collector runs before each timed run, and a
timed run keeps no result (each op's result is dropped before the next op).
"""

from __future__ import annotations

import asyncio
import gc
import math
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..lab.outcomes import describe
from .cases import Case, Implementation
from .dataset import Dataset
from .operations import Operation
from .stats import Summary, summarize


@dataclass(frozen=True)
class Plan:
    """How long and how often each cell is timed."""

    repeats: int = 7
    target: float = 0.35
    """Seconds one timed run should last (the op count is chosen for it)."""
    max_ops: int = 20_000
    step_timeout: float = 120.0
    """A check, warm-up or timed run still going after this many seconds fails its cell."""


FULL_PLAN = Plan(repeats=12, target=0.1)
"""12 rounds: the median's 95 % interval is the 3rd to 10th sample (:func:`.stats.median_rank`)."""
QUICK_PLAN = Plan(repeats=3, target=0.02, max_ops=2_000, step_timeout=60.0)


@dataclass
class Cell:
    operation: str
    implementation: str
    concurrency: int
    loop: str = "asyncio"
    """The event loop it ran on (``asyncio``'s default, or ``uvloop``)."""
    samples: list[float] = field(default_factory=list)
    ops_per_run: int = 0
    seconds: float = 0.0
    """Time spent on the cell: check, warm-up, repeats, preparing inputs, clearing rows."""
    error: str | None = None

    @property
    def summary(self) -> Summary | None:
        return summarize(self.samples) if self.samples and self.error is None else None


Progress = Callable[[str], None]
"""Told the label of each group of cells (an operation at a concurrency level) as it starts."""


async def execute(
    impl: Implementation[Any],
    case: Case[Any],
    items: Sequence[Any],
    concurrency: int,
    *,
    keep: bool,
) -> tuple[float, list[Any]]:
    """Run one op per item over ``concurrency`` tasks; seconds taken, and the results
    in item order when ``keep`` (else an empty list)."""
    fn = case.fn
    shares = [list(items[t::concurrency]) for t in range(concurrency)]
    outputs: list[list[Any]] = [[] for _ in shares]

    async def work(share: list[Any], out: list[Any]) -> None:
        async with impl.task() as handle:
            if keep:
                for item in share:
                    out.append(await fn(handle, item))
            else:
                for item in share:
                    await fn(handle, item)

    started = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for share, out in zip(shares, outputs, strict=True):
            group.create_task(work(share, out))
    seconds = time.perf_counter() - started
    if not keep:
        return seconds, []
    results: list[Any] = [None] * len(items)
    for t, out in enumerate(outputs):
        results[t::concurrency] = out
    return seconds, results


def ops_for(per_op: float, concurrency: int, plan: Plan) -> int:
    """Ops for one timed run: about ``plan.target`` seconds, a multiple of ``concurrency``."""
    wanted = plan.target / per_op if per_op > 0 else plan.max_ops
    n = max(concurrency, min(plan.max_ops, math.ceil(wanted)))
    return math.ceil(n / concurrency) * concurrency


async def run_group(
    impls: Sequence[Implementation[Any]],
    op: Operation,
    concurrency: int,
    data: Dataset,
    plan: Plan,
    loop: str = "asyncio",
) -> list[Cell]:
    """Check, warm up and time one cell per implementation; failures are recorded in
    the cells (with no samples), never raised."""
    cells = [Cell(op.key, impl.key, concurrency, loop) for impl in impls]
    timed: list[tuple[Cell, Implementation[Any], Case[Any]]] = []
    for cell, impl in zip(cells, impls, strict=True):
        case = impl.cases.get(op.key)
        if case is None:
            cell.error = f"{impl.key} has no case for {op.key}"
        elif await _guarded(cell, op, data, plan, _prepare(cell, impl, case, op, data, plan)):
            timed.append((cell, impl, case))
    for _ in range(plan.repeats):
        for cell, impl, case in timed:
            if cell.error is None:
                await _guarded(cell, op, data, plan, _repeat(cell, impl, case, op, data))
    for cell in cells:
        if cell.error is not None:
            cell.samples.clear()
    return cells


async def _guarded(
    cell: Cell, op: Operation, data: Dataset, plan: Plan, step: Coroutine[Any, Any, None]
) -> bool:
    """Run one step of a cell (within ``plan.step_timeout``); False, and the cell
    marked failed, if it raised. The operation's rows are reset afterwards either way."""
    started = time.perf_counter()
    try:
        async with asyncio.timeout(plan.step_timeout):
            await step
    except TimeoutError:
        cell.error = f"a run was still going after {plan.step_timeout:.0f} s"
    except Exception as exc:
        cell.error = _describe(exc)
    finally:
        try:
            await op.reset(data)
        finally:
            cell.seconds += time.perf_counter() - started
    return cell.error is None


async def _prepare(
    cell: Cell,
    impl: Implementation[Any],
    case: Case[Any],
    op: Operation,
    data: Dataset,
    plan: Plan,
) -> None:
    """The check, then the warm-up that sets ``cell.ops_per_run``."""
    c = cell.concurrency
    await op.reset(data)
    items = await op.items(data, c, c)
    seconds, results = await execute(impl, case, items, c, keep=True)
    problems = await op.check(data, items, results)
    del results
    if problems:
        cell.error = "check failed: " + "; ".join(problems)
        return
    per_op = seconds / len(items)
    if seconds < plan.target:
        await op.reset(data)
        n = ops_for(per_op * 2, c, plan)  # about half a timed run
        items = await op.items(data, n, c)
        seconds, _ = await execute(impl, case, items, c, keep=False)
        per_op = seconds / n
    cell.ops_per_run = ops_for(per_op, c, plan)


async def _repeat(
    cell: Cell, impl: Implementation[Any], case: Case[Any], op: Operation, data: Dataset
) -> None:
    """One timed run: ``cell.ops_per_run`` ops, one sample."""
    n = cell.ops_per_run
    items = await op.items(data, n, cell.concurrency)
    gc.collect()
    seconds, _ = await execute(impl, case, items, cell.concurrency, keep=False)
    cell.samples.append(n / seconds)


def _describe(exc: BaseException) -> str:
    """The first leaf of an exception group (what a task raised), as one line."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return describe(exc)
