"""Where the microseconds of one operation go: a profile broken down by layer, per implementation.

For one operation (``get_by_pk`` by default) each implementation is

1. **checked** (``concurrency`` ops, :meth:`Operation.check`) and warmed up;
2. **timed** without a profiler: ``repeats`` runs of ``ops`` ops through
   :func:`.runner.execute` (the benchmark's own harness), interleaved across the
   implementations, each with the process's user and system CPU time
   (``getrusage``) beside its wall time; the medians are what the rows add up to;
3. **profiled** twice, under pyinstrument (``async_mode="disabled"``: the real
   stack of whatever runs, event loop and other tasks included, which is what a
   stack walk needs; ``"enabled"`` would fold an awaiting coroutine's wait into
   its ``await``). Each sample's time is given to ONE category: the stack is
   walked from the leaf outwards and the first frame a rule matches decides.

Rows add up to the unprofiled wall time per op, and only the Python layers come
from the profile:

- **waiting (off CPU)** = wall - user - system CPU, measured: the time the
  process was not running — the server's work and the round trip, the
  scheduler, the other processes of a shared machine;
- **kernel (system CPU)** = the system CPU time, measured: socket sends and
  receives, ``epoll``, page faults — and, under SQLAlchemy's asyncio layer, the
  ``mmap``/``munmap`` and first page fault of every new greenlet's frame stack
  (CPython 3.11 gives each greenlet a data-stack chunk of its own: one minor
  fault per ``greenlet_spawn``, recorded per op beside the table);
- every other category = its share of the profiled time outside those two x
  the user CPU time. Samples whose leaf is a selector's poll or a socket call
  are the profiler's view of the first two rows — wall time, which on a busy
  2-core machine includes the server running while this process sits in a
  ``send`` that woke it — so they are left out of the shares. The profiler hooks
  every Python and C call, which slows call-heavy code more than the rest; the
  shares carry that bias, and each run records its profiled µs per op beside
  the unprofiled one to show the overhead. Kernel work done inside a call the
  profiler sees (the greenlet's ``mmap`` happens inside ``greenlet.switch``) is
  in the kernel row and also in that layer's profiled wall time, so such a layer's
  share of the user time is somewhat too large.

The rules (:data:`RULES`, checked in order on each frame; a frame no rule matches
passes the sample on to its caller). Paths are relative to ``site-packages``,
the standard library or ``sys.path``; C functions appear as ``<built-in>``
frames named ``Type.method``:

=========================  ====================================================================
category                   frames
=========================  ====================================================================
waiting (off CPU)          ``<built-in>`` ``epoll.poll``, ``poll.poll``, ``select``… (the
                           selector; the row itself is measured: wall - CPU)
kernel (system CPU)        ``<built-in>`` ``socket.send``/``recv``… (the row itself is the
                           measured system CPU time)
greenlet bridge            ``greenlet`` (``switch``, ``throw``, ``getcurrent``, its package),
                           ``sqlalchemy/util/concurrency.py`` (``await_``,
                           ``greenlet_spawn``), the asyncio facade ``sqlalchemy/ext/asyncio/``
                           (``AsyncConnection``, ``AsyncResult``; not ``session.py``), and a
                           stack with no frame but the thread's (entering a new greenlet,
                           whose first frame has no caller)
statement: cache + compile ``sqlalchemy/sql/`` (cache key, ``_compile_w_cache``, compiler,
                           building statements) except ``construct_params`` and
                           ``_execute_on_connection``
execution context          ``sqlalchemy/engine/`` (``Connection.execute`` path,
                           ``_execute_context``, ``default.py``'s execution context, events,
                           transactions), ``construct_params`` (bind processing)
result and rows            ``sqlalchemy/engine/{cursor,result,row}.py``; ``sqlalchemy/orm/``
                           ``loading``, ``state``, ``instrumentation``, ``attributes``,
                           ``strategies``, ``identity``, ``collections`` (objects, instance
                           state)
ORM session layer          ``sqlalchemy/orm/`` (session, ``context.py``, ORM execute, mapper,
                           …), ``sqlalchemy/ext/asyncio/session.py``; Tortoise, Piccolo
DBAPI adapter              ``sqlalchemy/connectors/``, ``sqlalchemy/dialects/postgresql/``
                           ``asyncpg.py`` / ``psycopg.py`` (SQLAlchemy's DBAPI emulation over
                           an async driver: cursor, prepared-statement cache, status parsing)
                           except the JSON codecs it registers (→ driver)
pool checkout/checkin      ``sqlalchemy/pool/``, ``sqlalchemy/util/queue.py``,
                           ``Engine.connect``/``raw_connection``, ``Connection.__init__``/
                           ``close``; ``asyncpg/pool.py``, ``psycopg_pool/``
driver                     ``asyncpg/``, ``psycopg/`` (the protocol itself)
event loop                 ``asyncio/`` (but ``locks``, ``queues``, ``timeouts`` pass to their
                           caller: the layer using the primitive pays), ``selectors.py``,
                           ``uvloop/``
harness/other              anything else (the runner, the case functions, unmatched frames)
=========================  ====================================================================

Standard-library helpers (``re``, ``json``), ``sqlalchemy/util/``, ``sqlalchemy/event/``
and the type modules match nothing: their time goes to the layer that called them.

Profile under the default asyncio loop: uvloop waits in C, and the profiler
then books that wait on the Python frame that resumes after it (mostly the
driver's), which no rule can tell from work. The loop in use is recorded.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import platform
import resource
import statistics
import sys
import sysconfig
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, NamedTuple

from ..db import Database
from .cases import Case, Environment, Implementation
from .dataset import Dataset, Sizes
from .operations import OPERATIONS, Operation
from .runner import _describe, execute
from .stats import DASH, TIMES, number
from .suite import connected

WAITING = "waiting"
KERNEL = "kernel"
EVENT_LOOP = "event_loop"
DRIVER = "driver"
ADAPTER = "dbapi_adapter"
GREENLET = "greenlet"
POOL = "pool"
EXECUTION = "execution"
COMPILE = "compile"
RESULTS = "results"
ORM = "orm_session"
OTHER = "other"
PASS = "pass"
"""Not a category: a frame matching a PASS rule hands the sample to its caller."""

CATEGORIES: dict[str, str] = {
    WAITING: "waiting (off CPU)",
    KERNEL: "kernel (system CPU)",
    EVENT_LOOP: "event loop",
    DRIVER: "driver",
    ADAPTER: "DBAPI adapter",
    GREENLET: "greenlet bridge",
    POOL: "pool checkout/checkin",
    EXECUTION: "execution context",
    COMPILE: "statement: cache + compile",
    RESULTS: "result and rows",
    ORM: "ORM session layer",
    OTHER: "harness/other",
}
"""Category key → label, in the order the table lists them and the bars stack them."""

BUILTIN = "<built-in>"
THREAD = "<thread>"
GREENLET_START = "<thread>: a greenlet's first frame"


class Frame(NamedTuple):
    """One stack frame as a rule sees it."""

    module: str
    """File path inside its root (``sqlalchemy/engine/base.py``), or ``<built-in>``."""
    function: str
    """The code's name (``execute``); a C function's ``Type.method`` (``socket.send``)."""
    cls: str = ""
    """Class of ``self``/``cls`` when the profiler recorded one (``Connection``)."""


@dataclass(frozen=True)
class Rule:
    """Frames of these modules (path prefixes), and of these functions if any are given,
    belong to ``category``. A function is named ``name`` or ``Class.name``."""

    category: str
    modules: tuple[str, ...]
    functions: frozenset[str] = frozenset()

    def matches(self, frame: Frame) -> bool:
        if not frame.module.startswith(self.modules):
            return False
        if not self.functions:
            return True
        return frame.function in self.functions or f"{frame.cls}.{frame.function}" in self.functions


RULES: tuple[Rule, ...] = (
    Rule(WAITING, (BUILTIN,), frozenset({"epoll.poll", "poll.poll", "devpoll.poll", "select"})),
    Rule(WAITING, (BUILTIN,), frozenset({"kqueue.control"})),
    Rule(
        KERNEL,
        (BUILTIN,),
        frozenset(
            {"socket.send", "socket.sendall", "socket.sendmsg", "socket.recv", "socket.recv_into"}
        ),
    ),
    Rule(
        GREENLET,
        (BUILTIN,),
        frozenset(
            {
                "greenlet.switch",
                "greenlet.throw",
                "_AsyncIoGreenlet.switch",
                "_AsyncIoGreenlet.throw",
                "getcurrent",
            }
        ),
    ),
    Rule(GREENLET, ("greenlet/", "sqlalchemy/util/concurrency.py", "sqlalchemy/util/_concurrency")),
    Rule(ORM, ("sqlalchemy/ext/asyncio/session.py", "sqlalchemy/ext/asyncio/scoping.py")),
    Rule(GREENLET, ("sqlalchemy/ext/asyncio/",)),
    Rule(
        DRIVER,
        ("sqlalchemy/dialects/postgresql/asyncpg.py",),
        frozenset({"_json_decoder", "_jsonb_decoder", "_json_encoder", "_jsonb_encoder"}),
    ),
    Rule(
        ADAPTER,
        (
            "sqlalchemy/connectors/",
            "sqlalchemy/dialects/postgresql/asyncpg.py",
            "sqlalchemy/dialects/postgresql/psycopg.py",
        ),
    ),
    Rule(
        POOL, ("sqlalchemy/pool/", "sqlalchemy/util/queue.py", "asyncpg/pool.py", "psycopg_pool/")
    ),
    Rule(
        POOL,
        ("sqlalchemy/engine/base.py",),
        frozenset({"connect", "raw_connection", "Connection.__init__", "Connection.close"}),
    ),
    Rule(
        RESULTS,
        ("sqlalchemy/engine/cursor.py", "sqlalchemy/engine/result.py", "sqlalchemy/engine/row.py"),
    ),
    Rule(EXECUTION, ("sqlalchemy/engine/",)),
    Rule(
        EXECUTION, ("sqlalchemy/sql/",), frozenset({"construct_params", "_execute_on_connection"})
    ),
    Rule(COMPILE, ("sqlalchemy/sql/",)),
    Rule(
        RESULTS,
        tuple(
            f"sqlalchemy/orm/{name}.py"
            for name in (
                "loading",
                "state",
                "instrumentation",
                "attributes",
                "strategies",
                "identity",
                "collections",
            )
        ),
    ),
    Rule(ORM, ("sqlalchemy/orm/", "tortoise/", "piccolo/")),
    Rule(COMPILE, ("pypika",)),
    Rule(DRIVER, ("asyncpg/", "psycopg/", "psycopg_binary/", "psycopg_c/")),
    Rule(PASS, ("asyncio/locks.py", "asyncio/queues.py", "asyncio/timeouts.py")),
    Rule(EVENT_LOOP, ("asyncio/", "selectors.py", "uvloop/")),
    Rule(OTHER, ("orm_async_tests/", "pyinstrument/")),
)


@cache
def _roots() -> tuple[str, ...]:
    """Directories a frame's path is made relative to, longest first."""
    found = {sysconfig.get_paths()["stdlib"], *(p for p in sys.path if p)}
    return tuple(sorted((os.path.join(p, "") for p in found), key=len, reverse=True))


def module_path(path: str) -> str:
    """``…/site-packages/sqlalchemy/engine/base.py`` → ``sqlalchemy/engine/base.py``; a
    standard-library or ``sys.path`` file relative to its root; anything else unchanged."""
    path = path.replace("\\", "/")
    for marker in ("/site-packages/", "/dist-packages/"):
        if marker in path:
            return path.rsplit(marker, 1)[1]
    for root in _roots():
        if path.startswith(root):
            return path[len(root) :]
    return path


def parse_frame(info: str) -> Frame:
    """A pyinstrument frame record (``function\\0path\\0line`` + ``\\1``-separated attributes,
    ``c<Class>`` among them) as a :class:`Frame`."""
    identifier, *attributes = info.split("\x01")
    function, path, *_ = [*identifier.split("\x00"), "", ""]
    cls = next((a[1:] for a in attributes if a.startswith("c")), "")
    return Frame(path if path in (BUILTIN, THREAD) else module_path(path), function, cls)


def decide(stack: Sequence[Frame], rules: Sequence[Rule] = RULES) -> tuple[str, Frame | None]:
    """A sample's category and the frame that decided it: the first frame from the leaf
    (``stack[-1]``) outwards that a rule matches; a stack of nothing but the thread is a
    greenlet's start (``None`` decided it, as it does for a stack no rule matches)."""
    for frame in reversed(stack):
        rule = next((r for r in rules if r.matches(frame)), None)
        if rule is not None and rule.category != PASS:
            return rule.category, frame
    if all(frame.module == THREAD for frame in stack):
        return GREENLET, None
    return OTHER, None


def classify(stack: Sequence[Frame], rules: Sequence[Rule] = RULES) -> str:
    """The category of a sample (see :func:`decide`)."""
    return decide(stack, rules)[0]


def frame_name(frame: Frame) -> str:
    """``sqlalchemy/engine/base.py:execute``, as the report lists a frame."""
    return f"{frame.module}:{frame.function}"


def _add(counter: dict[str, float], key: str, seconds: float) -> None:
    counter[key] = counter.get(key, 0.0) + seconds


@dataclass
class Tally:
    """Profiled seconds per category; the frames that decided each category, and the leaf
    frames of the samples no rule matched (to check the rules against a real profile)."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0.0))
    deciders: dict[str, dict[str, float]] = field(default_factory=dict)
    unmatched: dict[str, float] = field(default_factory=dict)
    samples: int = 0

    def add(self, stack: Sequence[Frame], seconds: float) -> None:
        category, frame = decide(stack)
        self.seconds[category] += seconds
        self.samples += 1
        if frame is not None or category != OTHER:
            name = frame_name(frame) if frame is not None else GREENLET_START
            _add(self.deciders.setdefault(category, {}), name, seconds)
        elif stack:
            _add(self.unmatched, frame_name(stack[-1]), seconds)

    def top(self, counter: dict[str, float], n: int) -> list[tuple[str, float]]:
        """The ``n`` largest entries of ``counter`` as shares of all profiled time."""
        total = sum(self.seconds.values()) or 1.0
        largest = sorted(counter.items(), key=lambda item: item[1], reverse=True)[:n]
        return [(name, seconds / total) for name, seconds in largest]


def tally(records: Iterable[tuple[Sequence[str], float]]) -> Tally:
    """Sum pyinstrument's ``(stack, seconds)`` frame records by category."""
    found = Tally()
    for stack, seconds in records:
        found.add([parse_frame(info) for info in stack], seconds)
    return found


class Timing(NamedTuple):
    """µs per op of one unprofiled run: wall clock, and the process's CPU time."""

    wall: float
    user: float
    system: float
    faults: float = 0.0
    """Minor page faults per op (not µs): a new greenlet's frame stack is a fresh mapping."""

    def measured(self, key: str) -> float:
        """The measured rows of this run alone: ``waiting`` or ``kernel`` µs per op."""
        if key == KERNEL:
            return self.system
        return max(0.0, self.wall - self.user - self.system)


MEASURED = (WAITING, KERNEL)
"""The categories measured without the profiler (their samples are left out of the shares)."""


def scale(profiled: Mapping[str, float], timing: Timing) -> dict[str, float]:
    """µs per op by category, adding up to ``timing.wall``: ``waiting`` = wall - CPU,
    ``kernel`` = system CPU, every other category its share of the profiled time outside
    those two x user CPU (CPU above the wall time, a clock's rounding, is scaled down)."""
    cpu = timing.user + timing.system
    fit = min(1.0, timing.wall / cpu) if cpu > 0 else 0.0
    user, system = timing.user * fit, timing.system * fit
    scaled = dict.fromkeys(CATEGORIES, 0.0)
    scaled[WAITING] = timing.wall - user - system
    scaled[KERNEL] = system
    python = {k: v for k, v in profiled.items() if k not in MEASURED and v > 0}
    total = sum(python.values())
    if total == 0:
        scaled[OTHER] += user
    for key, seconds in python.items():
        scaled[key] += seconds / total * user
    return scaled


# -- results ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Breakdown:
    """One profiled run: µs per op by category (scaled to the unprofiled time)."""

    micros: dict[str, float]
    profiled_micros: float
    """Wall µs per op of the profiled run itself (the profiler's overhead included)."""
    samples: int
    deciders: dict[str, list[tuple[str, float]]]
    """Per category, the frames that decided the most of its samples (share of profiled time)."""
    unmatched: list[tuple[str, float]]
    """The leaf frames of the samples no rule matched, with their share of profiled time."""


@dataclass
class ImplProfile:
    """One implementation's timed and profiled runs (or why it has none)."""

    implementation: str
    label: str
    timings: list[Timing] = field(default_factory=list)
    """The unprofiled runs."""
    runs: list[Breakdown] = field(default_factory=list)
    error: str | None = None

    @property
    def timing(self) -> Timing:
        """The median of each column of the unprofiled runs (wall, user, system, faults)."""
        return Timing(*(statistics.median(column) for column in zip(*self.timings, strict=True)))


@dataclass
class ProfileRun:
    """A whole profile: what it ran on, and every implementation's result."""

    meta: dict[str, Any]
    results: list[ImplProfile] = field(default_factory=list)

    def result(self, key: str) -> ImplProfile | None:
        return next((r for r in self.results if r.implementation == key), None)


def to_json(run: ProfileRun) -> dict[str, Any]:
    def one(r: ImplProfile) -> dict[str, Any]:
        done = r.error is None and bool(r.timings)
        return {
            **asdict(r),
            "timings": [t._asdict() for t in r.timings],
            "median": r.timing._asdict() if done else None,
        }

    return {"meta": run.meta, "results": [one(r) for r in run.results]}


# -- measuring ----------------------------------------------------------------------------

DEFAULT_INTERVAL = 0.0001
"""Seconds between pyinstrument samples (its overhead is per call, not per sample)."""
PROFILES = 2
"""Profiled runs per implementation: a published figure must reproduce."""


@dataclass(frozen=True)
class ProfilePlan:
    """How many ops each run does, and how many runs of each kind."""

    ops: int
    concurrency: int
    repeats: int = 5
    """Unprofiled timed runs per implementation (their median is the total)."""
    profiles: int = PROFILES
    interval: float = DEFAULT_INTERVAL


@dataclass(frozen=True)
class Cell:
    """An implementation, its case, and the result it fills in."""

    impl: Implementation[Any]
    case: Case[Any]
    result: ImplProfile


async def _timed(cell: Cell, items: Sequence[Any], concurrency: int) -> None:
    """One unprofiled run: its wall, user and system µs per op."""
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF)
    seconds, _ = await execute(cell.impl, cell.case, items, concurrency, keep=False)
    after = resource.getrusage(resource.RUSAGE_SELF)
    per_op = 1e6 / len(items)
    cell.result.timings.append(
        Timing(
            seconds * per_op,
            (after.ru_utime - before.ru_utime) * per_op,
            (after.ru_stime - before.ru_stime) * per_op,
            (after.ru_minflt - before.ru_minflt) / len(items),
        )
    )


async def _profiled(
    cell: Cell, items: Sequence[Any], concurrency: int, interval: float
) -> tuple[Tally, float]:
    """One run under pyinstrument: what its samples add up to, and its wall µs per op."""
    from pyinstrument import Profiler

    gc.collect()
    profiler = Profiler(interval=interval, async_mode="disabled")
    profiler.start()
    try:
        seconds, _ = await execute(cell.impl, cell.case, items, concurrency, keep=False)
    finally:
        session = profiler.stop()
    return tally(session.frame_records), seconds / len(items) * 1e6


def _breakdown(result: ImplProfile, found: Tally, profiled_micros: float) -> Breakdown:
    return Breakdown(
        micros=scale(found.seconds, result.timing),
        profiled_micros=profiled_micros,
        samples=found.samples,
        deciders={k: found.top(c, 6) for k, c in found.deciders.items()},
        unmatched=found.top(found.unmatched, 8),
    )


async def _check(cell: Cell, op: Operation, data: Dataset, concurrency: int) -> bool:
    """The cell's check (its results are right) and a first warm-up; False if it failed."""
    try:
        items = await op.items(data, concurrency, concurrency)
        _, results = await execute(cell.impl, cell.case, items, concurrency, keep=True)
        problems = await op.check(data, items, results)
    except Exception as exc:
        cell.result.error = _describe(exc)
        return False
    finally:
        await op.reset(data)
    if problems:
        cell.result.error = "check failed: " + "; ".join(problems)
    return not problems


async def _measure(cells: Sequence[Cell], op: Operation, data: Dataset, plan: ProfilePlan) -> None:
    """Warm up, time (interleaved), then profile each cell ``plan.profiles`` times."""
    c = plan.concurrency
    items = await op.items(data, plan.ops, c)
    for cell in cells:
        await execute(cell.impl, cell.case, items, c, keep=False)
    for _ in range(plan.repeats):
        for cell in cells:
            await _timed(cell, items, c)
    for _ in range(plan.profiles):
        for cell in cells:
            found, micros = await _profiled(cell, items, c, plan.interval)
            cell.result.runs.append(_breakdown(cell.result, found, micros))
    await op.reset(data)


def _meta(db: Database, op: Operation, data: Dataset, plan: ProfilePlan) -> dict[str, Any]:
    from sqlalchemy.util._has_cython import _CYEXTENSION_MSG, HAS_CYEXTENSION

    loop = type(asyncio.get_running_loop())
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "operation": op.key,
        "title": op.title,
        "one_op": op.describe(data),
        **asdict(plan),
        "event_loop": f"{loop.__module__}.{loop.__qualname__}",
        "sqlalchemy_cython": HAS_CYEXTENSION,
        "sqlalchemy_cython_detail": _CYEXTENSION_MSG,
        "versions": versions(),
        "database": db.describe(),
        "cpus": os.cpu_count(),
        "machine": f"{platform.system()} {platform.machine()}",
        "categories": CATEGORIES,
    }


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("sqlalchemy", "asyncpg", "greenlet", "pyinstrument", "psycopg", "uvloop"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


async def run_profile(
    db: Database,
    impls: Sequence[Implementation[Any]],
    operation: str,
    ops: int,
    concurrency: int,
    *,
    sizes: Sizes | None = None,
    repeats: int = 5,
    interval: float = DEFAULT_INTERVAL,
) -> ProfileRun:
    """Profile ``ops`` ops of ``operation`` at ``concurrency`` for each implementation (each
    opened, checked, timed, profiled :data:`PROFILES` times, closed); the rows the run seeds
    are gone when it returns. An implementation that fails its check gets no numbers."""
    op = OPERATIONS[operation]
    plan = ProfilePlan(ops=ops, concurrency=concurrency, repeats=repeats, interval=interval)
    data = Dataset(db, sizes or Sizes())
    run = ProfileRun(meta=_meta(db, op, data, plan))
    env = Environment(db, pool_size=concurrency)
    async with connected(data, impls, env, writers=concurrency):
        cells = []
        for impl in impls:
            result = ImplProfile(impl.key, impl.label)
            run.results.append(result)
            case = impl.cases.get(operation)
            if case is None:
                result.error = f"{impl.key} has no case for {operation}"
                continue
            cell = Cell(impl, case, result)
            if await _check(cell, op, data, concurrency):
                cells.append(cell)
        await _measure(cells, op, data, plan)
    return run


# -- report -------------------------------------------------------------------------------


def _measured(run: ProfileRun) -> list[ImplProfile]:
    return [r for r in run.results if r.error is None and r.runs]


def _span(values: Sequence[float]) -> str:
    """``12.3`` when the runs agree to three figures, else ``12.1-12.6`` (min-max)."""
    low, high = number(min(values)), number(max(values))
    return low if low == high else f"{low}{DASH}{high}"


def headline(run: ProfileRun) -> str:
    m = run.meta
    v = m["versions"]
    cython = (
        "compiled" if m["sqlalchemy_cython"] else f"NOT compiled ({m['sqlalchemy_cython_detail']})"
    )
    return (
        f"{m['date'][:10]} · {m['title']} ({m['one_op']}) · {m['ops']:,} ops at concurrency "
        f"{m['concurrency']} · Python {v['python']} · SQLAlchemy {v['sqlalchemy']} "
        f"(Cython extensions {cython}) · asyncpg {v.get('asyncpg', '?')} · "
        f"pyinstrument {v.get('pyinstrument', '?')}, interval {m['interval'] * 1e3:g} ms · "
        f"loop {m['event_loop']} · {m['cpus']} CPUs"
    )


def markdown(run: ProfileRun, *, title: str = "Profile") -> str:
    measured = _measured(run)
    out = [f"# {title}: where the microseconds of one op go", "", headline(run), ""]
    out.append(
        f"µs per op by category, each run scaled to the median of {run.meta['repeats']} "
        f"unprofiled runs (so each run's rows add up to *total*). *waiting* (wall - CPU) and "
        f"*kernel* (system CPU) are measured: their cells are the unprofiled runs' "
        f"min{DASH}max. The Python layers share the user CPU time as the profile saw it: "
        f"their cells are the {run.meta['profiles']} profiled runs' min{DASH}max."
    )
    out += ["", "| category | " + " | ".join(r.label for r in measured) + " |"]
    out.append("|---|" + "---:|" * len(measured))
    for key, label in CATEGORIES.items():
        cells = [_span(_row(r, key)) for r in measured]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    out += _totals(run, measured)
    out += _unmatched(measured)
    failed = [r for r in run.results if r.error is not None]
    if failed:
        out += ["", "## Not profiled", ""]
        out += [f"- {r.label}: {r.error}" for r in failed]
    out.append("")
    return "\n".join(out)


def _row(result: ImplProfile, key: str) -> list[float]:
    """A category's figures: the unprofiled runs' for a measured row, else the profiled runs'."""
    if key in MEASURED:
        return [t.measured(key) for t in result.timings]
    return [b.micros[key] for b in result.runs]


def _totals(run: ProfileRun, measured: Sequence[ImplProfile]) -> list[str]:
    base = run.result("asyncpg")
    base_wall = base.timing.wall if base is not None and base in measured else None
    rows = {
        "**total** (unprofiled wall)": [f"**{number(r.timing.wall)}**" for r in measured],
        "total ÷ asyncpg's": [
            DASH if base_wall is None else f"{number(r.timing.wall / base_wall)}{TIMES}"
            for r in measured
        ],
        "user CPU": [number(r.timing.user) for r in measured],
        "minor page faults per op": [f"{r.timing.faults:.2f}" for r in measured],
        f"unprofiled runs (min{DASH}max)": [_span([t.wall for t in r.timings]) for r in measured],
        "profiled runs (with the profiler)": [
            _span([b.profiled_micros for b in r.runs]) for r in measured
        ],
        "samples per profiled run": ["/".join(f"{b.samples:,}" for b in r.runs) for r in measured],
    }
    return [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows.items()]


def _unmatched(measured: Sequence[ImplProfile]) -> list[str]:
    out = ["", "Leaf frames no rule matched (share of profiled time, first run):", ""]
    for r in measured:
        shown = ", ".join(f"`{name}` {share:.1%}" for name, share in r.runs[0].unmatched[:5])
        out.append(f"- {r.label}: {shown or DASH}")
    return out


COLOURS = (
    "#bdbdbd",
    "#8c8c8c",
    "#6baed6",
    "#2171b5",
    "#9e9ac8",
    "#e6550d",
    "#fdae6b",
    "#d62728",
    "#ff9896",
    "#31a354",
    "#a1d99b",
    "#636363",
)


def chart(run: ProfileRun, path: Path) -> Path:
    """Horizontal stacked bars, one per implementation and profiled run; asyncpg's total dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    measured = _measured(run)
    bars = [(f"{r.label} · run {i + 1}", b) for r in measured for i, b in enumerate(r.runs)]
    fig = Figure(figsize=(11, 1.6 + 0.4 * len(bars)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ys = list(range(len(bars)))[::-1]
    left = [0.0] * len(bars)
    for (key, label), colour in zip(CATEGORIES.items(), COLOURS, strict=True):
        widths = [b.micros[key] for _, b in bars]
        ax.barh(ys, widths, left=left, color=colour, label=label, height=0.7)
        left = [a + w for a, w in zip(left, widths, strict=True)]
    base = run.result("asyncpg")
    if base is not None and base in measured:
        ax.axvline(base.timing.wall, color="#222222", linewidth=0.8, linestyle="--")
    ax.set_yticks(ys, [name for name, _ in bars], fontsize=8)
    ax.set_xlabel("µs per op (unprofiled total; dashed: asyncpg's)")
    ax.grid(axis="x", linewidth=0.3)
    ax.set_axisbelow(True)
    fig.legend(ncols=6, fontsize=7, loc="outside lower center")
    m = run.meta
    ax.set_title(
        f"{m['title']} · concurrency {m['concurrency']} · {m['ops']:,} ops · SQLAlchemy "
        f"{m['versions']['sqlalchemy']} (Cython {'on' if m['sqlalchemy_cython'] else 'off'})",
        fontsize=9,
    )
    fig.savefig(path, dpi=110)
    return path


def write(run: ProfileRun, directory: Path) -> list[Path]:
    """``profile.json``, ``profile.md`` and ``profile.png`` in ``directory`` (created)."""
    directory.mkdir(parents=True, exist_ok=True)
    json_path, md_path = directory / "profile.json", directory / "profile.md"
    json_path.write_text(json.dumps(to_json(run), indent=2) + "\n", encoding="utf-8")
    md_path.write_text(markdown(run), encoding="utf-8")
    return [json_path, md_path, chart(run, directory / "profile.png")]
