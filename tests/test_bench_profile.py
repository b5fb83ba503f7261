"""The profile breakdown: which category a sample's stack lands in, how the categories are
scaled to the unprofiled time, and one tiny profile on the test database.

No timing is ever asserted: only where samples go and that the rows add up.
"""

from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path

import pytest

from orm_async_tests.bench import profile
from orm_async_tests.bench.profile import (
    ADAPTER,
    CATEGORIES,
    COMPILE,
    DRIVER,
    EVENT_LOOP,
    EXECUTION,
    GREENLET,
    KERNEL,
    ORM,
    OTHER,
    POOL,
    RESULTS,
    WAITING,
    Breakdown,
    Frame,
    ImplProfile,
    ProfileRun,
    Timing,
    classify,
    module_path,
    parse_frame,
    scale,
    tally,
)
from orm_async_tests.bench.stats import TIMES
from orm_async_tests.db import Database

from .test_bench import needs_bench_group

THREAD = Frame("<thread>", "MainThread")
LOOP = [
    THREAD,
    Frame("asyncio/base_events.py", "run_forever"),
    Frame("asyncio/base_events.py", "_run_once"),
    Frame("asyncio/events.py", "_run"),
]
CASE = [*LOOP, Frame("orm_async_tests/bench/runner.py", "work")]
CORE = [
    *CASE,
    Frame("orm_async_tests/bench/impl_sqlalchemy_best.py", "get_by_pk"),
    Frame("sqlalchemy/ext/asyncio/engine.py", "execute"),
    Frame("sqlalchemy/util/concurrency.py", "greenlet_spawn"),
]
IN_GREENLET = [
    THREAD,
    Frame("sqlalchemy/engine/base.py", "execute"),
    Frame("sqlalchemy/sql/elements.py", "_execute_on_connection"),
    Frame("sqlalchemy/engine/base.py", "_execute_clauseelement"),
]
ADAPTED = [
    *CORE,
    Frame("sqlalchemy/dialects/postgresql/asyncpg.py", "_prepare_and_execute", "Cursor"),
]
BUILTIN = "<built-in>"


def builtin(name: str) -> Frame:
    return Frame(BUILTIN, name)


@pytest.mark.parametrize(
    ("stack", "category"),
    [
        ([*LOOP, Frame("selectors.py", "select"), builtin("epoll.poll")], WAITING),
        ([*LOOP, Frame("asyncio/selector_events.py", "write"), builtin("socket.send")], KERNEL),
        ([*LOOP, Frame("selectors.py", "select")], EVENT_LOOP),
        (CORE, GREENLET),
        ([*CORE, builtin("_AsyncIoGreenlet.switch")], GREENLET),
        ([*IN_GREENLET, Frame("sqlalchemy/util/concurrency.py", "await_")], GREENLET),
        ([THREAD], GREENLET),
        (IN_GREENLET, EXECUTION),
        ([*IN_GREENLET, Frame("sqlalchemy/sql/compiler.py", "construct_params")], EXECUTION),
        ([*IN_GREENLET, Frame("sqlalchemy/sql/elements.py", "_compile_w_cache")], COMPILE),
        ([*IN_GREENLET, Frame("sqlalchemy/sql/cache_key.py", "_generate_cache_key")], COMPILE),
        ([*IN_GREENLET, Frame("sqlalchemy/engine/cursor.py", "__init__")], RESULTS),
        ([THREAD, Frame("sqlalchemy/orm/loading.py", "_instance")], RESULTS),
        ([THREAD, Frame("sqlalchemy/orm/session.py", "_get_impl")], ORM),
        ([*CASE, Frame("sqlalchemy/ext/asyncio/session.py", "get")], ORM),
        ([THREAD, Frame("sqlalchemy/engine/base.py", "connect", "OptionEngine")], POOL),
        ([THREAD, Frame("sqlalchemy/engine/base.py", "__init__", "Connection")], POOL),
        ([THREAD, Frame("sqlalchemy/engine/base.py", "__init__", "RootTransaction")], EXECUTION),
        ([THREAD, Frame("sqlalchemy/pool/base.py", "_checkout")], POOL),
        ([*CASE, Frame("asyncpg/pool.py", "acquire")], POOL),
        # a standard-library helper or an asyncio primitive is charged to its caller
        (ADAPTED, ADAPTER),
        ([*ADAPTED, Frame("re/__init__.py", "match"), builtin("Pattern.match")], ADAPTER),
        ([*ADAPTED, Frame("asyncio/locks.py", "acquire")], ADAPTER),
        ([*ADAPTED, Frame("asyncpg/prepared_stmt.py", "fetch")], DRIVER),
        ([*ADAPTED, Frame("sqlalchemy/dialects/postgresql/asyncpg.py", "_jsonb_decoder")], DRIVER),
        (
            [
                *CASE,
                Frame("asyncpg/connection.py", "_do_execute"),
                Frame("json/decoder.py", "decode"),
            ],
            DRIVER,
        ),
        # the event machinery and util helpers belong to whoever fired them
        ([*IN_GREENLET, Frame("sqlalchemy/event/attr.py", "__iter__")], EXECUTION),
        (
            [
                THREAD,
                Frame("sqlalchemy/pool/base.py", "checkout"),
                Frame("sqlalchemy/event/attr.py", "__call__"),
            ],
            POOL,
        ),
        ([*CASE, Frame("orm_async_tests/bench/impl_asyncpg.py", "get_by_pk")], OTHER),
        ([*LOOP, Frame("somewhere/else.py", "f")], EVENT_LOOP),
        ([THREAD, Frame("somewhere/else.py", "f")], OTHER),
    ],
)
def test_a_sample_goes_to_the_first_frame_a_rule_matches_from_the_leaf(
    stack: list[Frame], category: str
) -> None:
    assert classify(stack) == category


def test_frames_are_read_as_pyinstrument_records_them() -> None:
    stdlib = sysconfig.get_paths()["stdlib"]
    site = "/venv/lib/python3.11/site-packages"
    assert module_path(f"{site}/sqlalchemy/engine/base.py") == "sqlalchemy/engine/base.py"
    assert module_path(f"{stdlib}/asyncio/events.py") == "asyncio/events.py"
    assert module_path("/nowhere/x.py") == "/nowhere/x.py"
    method = f"execute\x00{site}/sqlalchemy/engine/base.py\x001450\x01cConnection\x01l1460"
    assert parse_frame(method) == Frame("sqlalchemy/engine/base.py", "execute", "Connection")
    assert parse_frame("socket.send\x00<built-in>\x000") == Frame(BUILTIN, "socket.send")
    assert parse_frame("MainThread\x00<thread>\x00140") == THREAD


def test_tally_sums_seconds_by_category_and_lists_what_no_rule_matched() -> None:
    site = "/venv/lib/python3.11/site-packages"
    thread = "MainThread\x00<thread>\x001"
    records = [
        ([thread, f"execute\x00{site}/sqlalchemy/engine/base.py\x001"], 0.003),
        ([thread, "epoll.poll\x00<built-in>\x000"], 0.002),
        ([thread, "f\x00/nowhere/x.py\x001"], 0.001),
        ([thread], 0.004),
    ]
    found = tally(records)
    assert found.samples == 4
    assert found.seconds[EXECUTION] == 0.003
    assert found.seconds[WAITING] == 0.002
    assert found.seconds[OTHER] == 0.001
    assert found.seconds[GREENLET] == 0.004
    [(leaf, share)] = found.top(found.unmatched, 5)
    assert leaf == "/nowhere/x.py:f"
    assert share == pytest.approx(0.1)
    assert found.deciders[EXECUTION] == {"sqlalchemy/engine/base.py:execute": 0.003}


def test_scaled_rows_add_up_to_the_unprofiled_time() -> None:
    profiled = dict.fromkeys(CATEGORIES, 0.0) | {
        WAITING: 5.0,
        KERNEL: 7.0,
        GREENLET: 1.0,
        EXECUTION: 3.0,
    }
    rows = scale(profiled, Timing(wall=100.0, user=40.0, system=10.0))
    assert rows[WAITING] == 50.0
    assert rows[KERNEL] == 10.0
    assert rows[GREENLET] == 10.0
    assert rows[EXECUTION] == 30.0
    assert math.fsum(rows.values()) == pytest.approx(100.0)
    assert set(rows) == set(CATEGORIES)


def test_cpu_above_the_wall_time_is_scaled_down_and_no_sample_means_other() -> None:
    rows = scale(dict.fromkeys(CATEGORIES, 0.0), Timing(wall=10.0, user=9.0, system=3.0))
    assert rows[WAITING] == 0.0
    assert rows[KERNEL] == pytest.approx(2.5)
    assert rows[OTHER] == pytest.approx(7.5)
    assert math.fsum(rows.values()) == pytest.approx(10.0)


def fake_run() -> ProfileRun:
    """Two implementations, two profiled runs each, no database."""
    meta = {
        "date": "2026-01-01T00:00:00+00:00",
        "operation": "get_by_pk",
        "title": "get by primary key",
        "one_op": "read one user",
        "ops": 100,
        "concurrency": 1,
        "repeats": 3,
        "profiles": 2,
        "interval": 0.0001,
        "event_loop": "asyncio.SelectorEventLoop",
        "sqlalchemy_cython": True,
        "sqlalchemy_cython_detail": "Loaded",
        "versions": {"python": "3.11", "sqlalchemy": "2.1"},
        "cpus": 2,
    }
    run = ProfileRun(meta)
    for key, wall in (("asyncpg", 50.0), ("sqlalchemy_best", 150.0)):
        result = ImplProfile(key, key.title())
        result.timings = [Timing(wall, wall / 2, wall / 10)] * 3
        for share in (0.4, 0.6):
            profiled = dict.fromkeys(CATEGORIES, 0.0) | {DRIVER: share, EXECUTION: 1 - share}
            result.runs.append(
                Breakdown(scale(profiled, result.timing), wall * 2, 10, {}, [("x.py:f", 0.01)])
            )
        run.results.append(result)
    failing = ImplProfile("broken", "Broken", error="check failed: user 1: wrong")
    run.results.append(failing)
    return run


def test_the_report_shows_both_runs_and_asyncpgs_total(tmp_path: Path) -> None:
    run = fake_run()
    table = profile.markdown(run)
    assert "| category | Asyncpg | Sqlalchemy_Best |" in table
    assert f"| {CATEGORIES[DRIVER]} | 10.0\N{EN DASH}15.0 | 30.0\N{EN DASH}45.0 |" in table
    assert f"| {CATEGORIES[WAITING]} | 20.0 | 60.0 |" in table
    assert f"| total ÷ asyncpg's | 1.00{TIMES} | 3.00{TIMES} |" in table
    assert "- Broken: check failed: user 1: wrong" in table
    written = profile.write(run, tmp_path)
    assert [p.name for p in written] == ["profile.json", "profile.md", "profile.png"]
    data = json.loads((tmp_path / "profile.json").read_text())
    assert data["results"][1]["median"] == {
        "wall": 150.0,
        "user": 75.0,
        "system": 15.0,
        "faults": 0,
    }
    assert data["results"][2]["median"] is None
    assert (tmp_path / "profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_bench_group
async def test_a_tiny_profile_checks_times_and_profiles_each_implementation(
    database: Database, tmp_path: Path
) -> None:
    from orm_async_tests.bench import impl_asyncpg, impl_sqlalchemy_best
    from orm_async_tests.bench.dataset import QUICK_SIZES

    impls = [impl_asyncpg.IMPL, impl_sqlalchemy_best.IMPL]
    run = await profile.run_profile(
        database, impls, "get_narrow", 40, 2, sizes=QUICK_SIZES, repeats=2
    )
    assert [r.implementation for r in run.results] == ["asyncpg", "sqlalchemy_best"]
    for result in run.results:
        assert result.error is None, result.error
        assert len(result.timings) == 2
        assert len(result.runs) == profile.PROFILES
        for breakdown in result.runs:
            assert breakdown.samples > 0
            assert math.fsum(breakdown.micros.values()) == pytest.approx(result.timing.wall)
    best = run.result("sqlalchemy_best")
    assert best is not None
    assert all(b.micros[GREENLET] > 0 for b in best.runs)
    assert isinstance(run.meta["sqlalchemy_cython"], bool)
    paths = profile.write(run, tmp_path)
    assert "| execution context |" in paths[1].read_text()


# -- attempts -----------------------------------------------------------------------------


def test_an_attempt_is_kept_only_beyond_the_noise() -> None:
    from orm_async_tests.bench.attempts import FAILED, KEPT, NOT_KEPT, REFERENCE, verdict
    from orm_async_tests.bench.stats import summarize

    best = summarize([100.0, 110.0, 120.0, 105.0, 115.0, 108.0])
    # 10 % faster in every round: the paired ratio's interval is above 1
    assert verdict(summarize([s * 1.1 for s in best.samples]), best) == KEPT
    # faster on the median, but one round in two slower: the interval straddles 1
    mixed = summarize([90.0, 200.0, 95.0, 210.0, 92.0, 205.0])
    assert verdict(mixed, best) == NOT_KEPT
    assert verdict(summarize([300.0]), best, reference=True) == REFERENCE
    assert verdict(None, best) == FAILED
    assert verdict(best, None) == FAILED


def test_attempts_run_in_batches_whose_pools_fit_the_connection_budget() -> None:
    from orm_async_tests.bench.attempts import ATTEMPTS, CONNECTION_BUDGET, batches

    for level in (1, 10, 16):
        found = batches(ATTEMPTS, level)
        assert [a for batch in found for a in batch] == list(ATTEMPTS)
        assert all((len(batch) + 2) * level <= CONNECTION_BUDGET for batch in found)
    assert len(batches(ATTEMPTS, 1)) == 1


def test_every_attempt_says_what_it_changes_and_has_both_cases() -> None:
    from orm_async_tests.bench.attempts import ATTEMPTS, OPERATION_KEYS

    assert len({a.key for a in ATTEMPTS}) == len(ATTEMPTS)
    for attempt in ATTEMPTS:
        assert attempt.key.startswith("attempt_")
        assert attempt.change
        assert set(attempt.cases) == set(OPERATION_KEYS)
    assert [a.key for a in ATTEMPTS if a.reference] == ["attempt_exec_driver_sql"]


@needs_bench_group
async def test_a_tiny_attempts_run_checks_and_times_every_cell_under_each_loop(
    database: Database, tmp_path: Path
) -> None:
    from orm_async_tests.bench import attempts
    from orm_async_tests.bench.dataset import QUICK_SIZES
    from orm_async_tests.bench.runner import QUICK_PLAN

    chosen = (attempts.OPTION_AUTOCOMMIT, attempts.DRIVER_SQL)
    run = await attempts.run_attempts(
        database,
        [2],
        QUICK_PLAN,
        attempts=chosen,
        operations=("get_narrow",),
        sizes=QUICK_SIZES,
    )
    loops = list(run.meta["loops"])
    assert loops == [loop for loop in attempts.LOOPS if loop not in run.meta["loops_missing"]]
    assert loops[0] == "asyncio"
    assert [t.cell.error for t in run.timed if t.cell.error] == []
    found = attempts.outcomes(run)
    assert len(found) == len(loops) * 4
    assert {o.verdict for o in found if o.implementation == "attempt_exec_driver_sql"} == {
        attempts.REFERENCE
    }
    assert all(o.vs_best is not None and o.vs_asyncpg is not None for o in found)
    assert len(attempts.loop_comparisons(run)) == (2 if "uvloop" in loops else 0)
    md_path = attempts.write(run, tmp_path)[1]
    table = md_path.read_text()
    assert f"## {loops[-1]} · concurrency 2 · get by primary key, narrow row" in table
    assert "| execution_options AUTOCOMMIT (the old SA best) |" in table


@needs_bench_group
def test_bench_profile_writes_the_breakdowns_and_the_attempts(tmp_path: Path) -> None:
    """``bench --profile --quick``: every profiled pair gets its section and chart."""
    from orm_async_tests.bench.command import PROFILED

    from .commands import run_command

    ran = run_command(
        "orm-async-tests",
        "bench",
        "--profile",
        "--quick",
        "--concurrency",
        "1",
        "--out",
        str(tmp_path),
    )
    assert ran.code == 0, ran.text
    page = (tmp_path / "profile.md").read_text()
    for operation, level in PROFILED:
        assert (tmp_path / f"profile-{operation}-c{level}.png").read_bytes()[:4] == b"\x89PNG"
        assert f"![breakdown](profile-{operation}-c{level}.png)" in page
    assert len(json.loads((tmp_path / "profile.json").read_text())) == len(PROFILED)
    attempts = (tmp_path / "attempts.md").read_text()
    assert "## asyncio · concurrency 1 · get by primary key" in attempts
