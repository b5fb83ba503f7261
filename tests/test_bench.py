"""The benchmark: a quick run on the test database (every cell gets a number, files are
written, nothing is left behind), the statistics on fixed numbers, and the CLI's errors.

No timing is ever asserted: only that each cell passed its correctness check and
produced a positive rate.
"""

from __future__ import annotations

import io
import json
import math
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import bindparam, func, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from orm_async_tests import cli
from orm_async_tests.bench import missing_modules
from orm_async_tests.bench.cases import Environment, Implementation
from orm_async_tests.bench.connect import server_params
from orm_async_tests.bench.dataset import QUICK_SIZES, Dataset, users
from orm_async_tests.bench.operations import OPERATIONS, Update
from orm_async_tests.bench.runner import QUICK_PLAN, Cell, run_group
from orm_async_tests.bench.stats import (
    DASH,
    TIMES,
    geomean,
    geomean_of,
    median_rank,
    number,
    ratio,
    summarize,
    times,
)
from orm_async_tests.db import Database, Target
from orm_async_tests.models import User
from orm_async_tests.settings import Settings, normalize_url

from .commands import run_command

needs_bench_group = pytest.mark.skipif(
    bool(missing_modules()), reason="the bench dependency group is not installed"
)


@needs_bench_group
async def test_quick_bench_gives_every_cell_a_number(database: Database, tmp_path: Path) -> None:
    from orm_async_tests.bench import plots, report
    from orm_async_tests.bench.operations import OPERATIONS
    from orm_async_tests.bench.suite import IMPLEMENTATIONS, group_count, run_bench

    seen: list[str] = []
    # 4, not 10: one pool per implementation must fit the external server's 100 connections
    run = await run_bench(database, quick=True, concurrency=(1, 4), progress=seen.append)

    assert [(c.operation, c.implementation, c.concurrency, c.error) for c in run.failed] == []
    assert len(run.cells) == len(OPERATIONS) * 2 * len(IMPLEMENTATIONS)
    assert len(seen) == group_count((1, 4)) == len(OPERATIONS) * 2
    for cell in run.cells:
        summary = cell.summary
        assert summary is not None, cell
        assert len(summary.samples) == run.meta["plan"]["repeats"]
        assert all(math.isfinite(s) and s > 0 for s in summary.samples)
    assert {c.implementation for c in run.cells} == {i.key for i in IMPLEMENTATIONS}
    for impl in IMPLEMENTATIONS:
        assert set(impl.cases) == set(OPERATIONS), impl.key

    written = report.write(run, tmp_path) + plots.write(run, tmp_path)
    assert sorted(p.name for p in written) == [
        "bench-reads.png",
        "bench-writes.png",
        "bench.json",
        "bench.md",
    ]
    data = json.loads((tmp_path / "bench.json").read_text())
    assert all(isinstance(c["median"], float) and c["error"] is None for c in data["cells"])
    assert set(data["geomeans"]) == {"asyncio"}
    assert set(data["geomeans"]["asyncio"]) == {"1", "4"}
    for estimate in data["geomeans"]["asyncio"]["4"].values():
        assert estimate["low"] <= estimate["value"] <= estimate["high"]
    assert {g["ratio"] for g in data["goals"]} == {"core/asyncpg", "orm/tortoise", "orm/piccolo"}
    table = (tmp_path / "bench.md").read_text()
    assert "## asyncio, concurrency 1: operations per second" in table
    assert "## asyncio, concurrency 4: operations per second" in table
    assert "## Goals" in table
    assert "failed" not in table
    for op in OPERATIONS.values():
        assert f"| {op.title} |" in table
    for png in ("bench-reads.png", "bench-writes.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    async with database.sessions() as session:
        left = await session.scalar(
            select(func.count()).select_from(User).where(User.username.startswith("bench-"))
        )
    assert left == 0


class OnTheTestEngine(Implementation[AsyncConnection]):
    """Cases on a connection of the test database's own engine (nothing to open or close)."""

    label = "test"

    def __init__(self, key: str, engine: AsyncEngine) -> None:
        super().__init__()
        self.key = key
        self.engine = engine

    async def open(self, env: Environment) -> None:
        pass

    def task(self) -> AbstractAsyncContextManager[AsyncConnection]:
        return self.engine.connect()

    async def close(self) -> None:
        pass


async def run_one_group(
    database: Database, impls: list[OnTheTestEngine], operation: str
) -> list[Cell]:
    data = Dataset(database, QUICK_SIZES)
    await data.seed(writers=2)
    try:
        return await run_group(impls, OPERATIONS[operation], 2, data, QUICK_PLAN)
    finally:
        await data.drop()


async def test_a_wrong_or_failing_pattern_gets_no_number(database: Database) -> None:
    """A case whose results are wrong, or that raises, fails its cell and is never timed."""
    get_user = select(users).where(users.c.id == bindparam("b_id"))
    right, wrong, raising = (
        OnTheTestEngine(k, database.engine) for k in ("right", "wrong", "raising")
    )

    @right.case("get_by_pk")
    async def get(conn: AsyncConnection, user_id: int) -> Any:
        """Reads the user asked for."""
        return (await conn.execute(get_user, {"b_id": user_id})).one()

    @wrong.case("get_by_pk")
    async def get_another(conn: AsyncConnection, user_id: int) -> Any:
        """Reads the next user: fast, and wrong."""
        return (await conn.execute(get_user, {"b_id": user_id + 1})).one()

    @raising.case("get_by_pk")
    async def get_nothing(conn: AsyncConnection, user_id: int) -> Any:
        """Reads a user that does not exist."""
        return (await conn.execute(get_user, {"b_id": -user_id})).one()

    ok, bad, broken = await run_one_group(database, [right, wrong, raising], "get_by_pk")
    assert ok.error is None
    assert ok.summary is not None
    assert len(ok.samples) == QUICK_PLAN.repeats
    assert bad.summary is None
    assert bad.samples == []
    assert bad.error is not None
    assert bad.error.startswith("check failed: user ")
    assert broken.summary is None
    assert broken.error is not None
    assert broken.error.startswith("NoResultFound: ")


async def test_an_update_that_leaves_updated_at_fails_after_one_that_moved_it(
    database: Database,
) -> None:
    """Each cell's check sees its own writes: an earlier cell's ``updated_at`` does not count."""
    moving, stale = (OnTheTestEngine(k, database.engine) for k in ("moving", "stale"))

    @moving.case("update_partial")
    async def update_both(conn: AsyncConnection, item: Update) -> None:
        """Core UPDATE: ``onupdate`` sets updated_at."""
        await conn.execute(
            update(users).where(users.c.id == item.user_id).values(login_count=item.login_count)
        )
        await conn.commit()

    @stale.case("update_partial")
    async def update_count(conn: AsyncConnection, item: Update) -> None:
        """SQL text: login_count only, updated_at left as it was."""
        await conn.execute(
            text("UPDATE users SET login_count = :n WHERE id = :id"),
            {"n": item.login_count, "id": item.user_id},
        )
        await conn.commit()

    ok, bad = await run_one_group(database, [moving, stale], "update_partial")
    assert ok.error is None
    assert bad.error is not None
    assert bad.error.startswith("check failed: user ")
    assert "updated_at moved: False" in bad.error


def test_summary_is_the_median_and_its_interval() -> None:
    odd = summarize([30.0, 10.0, 20.0, 50.0, 40.0])
    assert (odd.median, odd.low, odd.high) == (30.0, 10.0, 50.0)
    assert odd.samples == (30.0, 10.0, 20.0, 50.0, 40.0)
    even = summarize([4.0, 1.0, 3.0, 2.0])
    assert (even.median, even.low, even.high) == (2.5, 1.0, 4.0)
    assert summarize([7.0]).median == 7.0
    # 12 samples: the 95 % interval of the median is the 3rd to the 10th (P = 0.961)
    twelve = summarize([float(v) for v in range(12, 0, -1)])
    assert (twelve.median, twelve.low, twelve.high) == (6.5, 3.0, 10.0)
    assert median_rank(12) == 3
    assert median_rank(9) == 2
    assert median_rank(6) == 1  # P(min < median < max) = 0.969
    assert median_rank(5) == 1  # no 95 % interval from 5 samples: the min-max, 0.94
    with pytest.raises(ValueError, match="no samples"):
        summarize([])
    with pytest.raises(ValueError, match="positive"):
        summarize([1.0, 0.0])


def test_ratios_and_geometric_means() -> None:
    fast, slow = summarize([200.0, 100.0, 300.0]), summarize([50.0, 40.0, 60.0])
    quarter, four = ratio(slow, fast), ratio(fast, slow)
    assert quarter is not None
    assert four is not None
    assert quarter.value == 0.25
    assert four.value == 4.0
    assert quarter.low <= 0.25 <= quarter.high
    assert four.low <= 4.0 <= four.high
    assert ratio(slow, fast) == quarter  # seeded: the same samples, the same interval
    assert ratio(None, fast) is None
    assert ratio(fast, None) is None
    assert geomean([2.0, 8.0]) == pytest.approx(4.0)
    assert geomean([0.5, 2.0, None]) == pytest.approx(1.0)
    assert geomean([1.0, 10.0, 100.0]) == pytest.approx(10.0)
    assert geomean([None, None]) is None
    assert geomean([]) is None
    with pytest.raises(ValueError, match="positive"):
        geomean([1.0, -1.0])


def test_a_paired_ratio_cancels_what_both_sides_of_a_round_shared() -> None:
    """Rounds that ran slow for both implementations (a busy machine) leave the ratio of
    the paired rounds steady; the same samples out of step give a wide interval."""
    load = [1.0, 0.5, 1.0, 0.6, 1.0, 0.7, 1.0, 0.5, 1.0, 0.6, 1.0, 0.8]
    top = summarize([2000.0 * f for f in load])
    bottom = summarize([1000.0 * f for f in load])
    paired = ratio(top, bottom)
    assert paired is not None
    assert (paired.low, paired.value, paired.high) == (2.0, 2.0, 2.0)
    shifted = summarize([1000.0 * f for f in load[1:] + load[:1]])
    unpaired = ratio(top, shifted)
    assert unpaired is not None
    assert unpaired.high - unpaired.low > 0.5


def test_a_geometric_mean_has_an_interval_around_it() -> None:
    a = [summarize([100.0, 110.0, 90.0, 105.0]), summarize([10.0, 12.0, 9.0, 11.0])]
    b = [summarize([50.0, 52.0, 48.0, 51.0]), summarize([20.0, 19.0, 21.0, 22.0])]
    g = geomean_of(zip(a, b, strict=True))
    assert g is not None
    assert g.value == pytest.approx(geomean([102.5 / 50.5, 10.5 / 20.5]))
    assert g.low < g.value < g.high
    assert geomean_of([(a[0], None)]) is None


def test_numbers_as_the_report_shows_them() -> None:
    assert number(16729.4) == "16,700"
    assert number(742.3) == "742"
    assert number(9.861) == "9.86"
    assert number(0.41234) == "0.412"
    assert number(0) == "0"
    assert times(0.5) == f"0.500{TIMES}"
    assert times(None) == DASH
    assert summarize([1000.0, 990.0, 1234.0]).shown() == f"1,000 (990{DASH}1,230)"


def test_asyncpg_and_tortoise_reach_the_same_server_and_schema() -> None:
    """Their connection parameters come from the target's URL and the settings."""
    socket = Target(normalize_url("postgresql://postgres@/postgres?host=/run/pg"))
    params = server_params(socket, Settings(database_url=None), "bench")
    assert (params.host, params.port, params.user, params.database) == (
        "/run/pg",
        5432,
        "postgres",
        "postgres",
    )
    assert params.asyncpg_kwargs()["server_settings"] == {"application_name": "bench"}
    assert "ssl" not in params.asyncpg_kwargs()

    url = normalize_url("postgresql://me:s3cret@db.example:6543/app?sslmode=require")
    settings = Settings(database_url=url, schema="bench_schema", connect_timeout=2.5)
    params = server_params(Target(url), settings, "bench")
    kwargs = params.asyncpg_kwargs()
    assert (kwargs["host"], kwargs["port"], kwargs["password"], kwargs["ssl"]) == (
        "db.example",
        6543,
        "s3cret",
        "require",
    )
    assert kwargs["server_settings"] == {"application_name": "bench", "search_path": "bench_schema"}
    assert kwargs["timeout"] == 2.5
    credentials = params.tortoise_credentials(10)
    assert credentials["schema"] == "bench_schema"
    assert (credentials["minsize"], credentials["maxsize"]) == (10, 10)


def test_bench_without_its_dependency_group_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("orm_async_tests.bench.missing_modules", lambda: ["tortoise"])
    assert cli.main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "poetry install --with bench" in err


def test_bench_refuses_a_concurrency_out_of_range(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--concurrency", "1", "0"])
    assert exit_.value.code == 2
    assert "between 1 and 16" in capsys.readouterr().err


@needs_bench_group
def test_bench_setup_error_is_one_line() -> None:
    ran = run_command(
        "orm-async-tests",
        "bench",
        "--quick",
        env={"DATABASE_URL": "postgresql://me:secret@127.0.0.1:1/db", "DB_SCHEMA": None},
    )
    assert ran.code == 2, ran.text
    assert ran.out == ""
    assert ran.err.startswith("error: cannot reach PostgreSQL at 127.0.0.1:1/db")
    assert ran.err.count("\n") == 1
    assert "secret" not in ran.err


def fake_run(scale: float) -> Any:
    """A run of two implementations on two operations, asyncpg's samples times ``scale``."""
    from orm_async_tests.bench.suite import BenchRun

    meta: dict[str, Any] = {
        "date": "2026-12-06T00:00:00+00:00",
        "quick": False,
        "concurrency": [1],
        "loops": ["asyncio"],
        "database": "a test",
        "postgresql": "18",
        "versions": dict.fromkeys(
            ("python", "sqlalchemy", "asyncpg", "psycopg", "tortoise-orm", "piccolo", "uvloop"),
            "1",
        ),
        "cpus": 2,
        "plan": {"repeats": 4, "target": 0.1},
        "operations": {
            op: {"title": OPERATIONS[op].title, "group": "reads", "one_op": "-"}
            for op in ("get_by_pk", "get_narrow")
        },
        "implementations": {"asyncpg": "asyncpg", "sqlalchemy_best": "SA best Core"},
        "patterns": {},
        "seconds": 1.0,
        "per_loop": {},
    }
    samples = [100.0, 104.0, 98.0, 102.0]
    cells = [
        Cell(op, impl, 1, samples=[s * (scale if impl == "asyncpg" else 0.5) for s in samples])
        for op in meta["operations"]
        for impl in meta["implementations"]
    ]
    return BenchRun(meta, cells)


@needs_bench_group
def test_compare_says_whether_a_second_run_reproduced_the_first(tmp_path: Path) -> None:
    from orm_async_tests.bench import report

    for name, scale in (("a", 1.0), ("b", 1.05), ("c", 1.3)):
        report.write(fake_run(scale), tmp_path / name)
    readme = tmp_path / "README.md"
    readme.write_text("top\n<!-- bench: start -->\nold\n<!-- bench: end -->\nbottom\n")

    def compare(other: str) -> Any:
        return run_command(
            "orm-async-tests",
            "bench",
            "--compare",
            str(tmp_path / "a" / "bench.json"),
            str(tmp_path / other / "bench.json"),
            "--out",
            str(tmp_path / f"vs-{other}"),
            "--readme",
            str(readme),
        )

    close, far = compare("b"), compare("c")
    assert close.code == 0, close.text
    assert "1 of 1 geometric means within ±10%" in close.out
    page = (tmp_path / "vs-b" / "reproduction.md").read_text()
    assert "-4.8%" in page  # core/asyncpg 0.5 → 0.5 / 1.05
    assert far.code == 1, far.text
    assert "beyond ±10 %" in (tmp_path / "vs-c" / "reproduction.md").read_text()
    text = readme.read_text()
    assert text.startswith("top\n<!-- bench: start -->")
    assert text.endswith("<!-- bench: end -->\nbottom\n")
    assert "old" not in text
    assert f"| SA best Core / asyncpg | 0.500{TIMES} (" in text


@needs_bench_group
def test_compare_of_a_file_that_is_not_a_run_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text("[]")
    ran = run_command(
        "orm-async-tests", "bench", "--compare", str(tmp_path / "x.json"), str(tmp_path / "nope")
    )
    assert ran.code == 2, ran.text
    assert ran.err.startswith("error: ")
    assert "is not a bench.json" in ran.err
    assert ran.err.count("\n") == 1


@needs_bench_group
def test_repeat_check_tells_overlapping_intervals_from_disjoint_ones() -> None:
    from rich.console import Console

    from orm_async_tests.bench.reproduce import repeat_check

    quiet = Console(file=io.StringIO(), width=200)
    same, slower = fake_run(1.0), fake_run(1.02)
    assert repeat_check(same, slower, quiet) == 0
    assert "4 of 4 cells reproduced" in quiet.file.getvalue()  # type: ignore[attr-defined]
    assert repeat_check(same, fake_run(1.5), quiet) == 1  # asyncpg's cells moved by 50 %


@needs_bench_group
def test_bench_runs_on_both_event_loops_from_the_command_line(tmp_path: Path) -> None:
    """The CLI's run: each loop in turn, merged into one report (two cheap cells)."""
    ran = run_command(
        "orm-async-tests",
        "bench",
        "--quick",
        "--concurrency",
        "1",
        "--loop",
        "asyncio",
        "uvloop",
        "--operations",
        "get_narrow",
        "--implementations",
        "asyncpg",
        "sqlalchemy_best",
        "--out",
        str(tmp_path),
    )
    assert ran.code == 0, ran.text
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["meta"]["loops"] == ["asyncio", "uvloop"]
    assert {(c["implementation"], c["loop"]) for c in data["cells"]} == {
        (impl, loop) for impl in ("asyncpg", "sqlalchemy_best") for loop in ("asyncio", "uvloop")
    }
    assert set(data["meta"]["per_loop"]) == {"asyncio", "uvloop"}
    assert data["loop_ratios"]["asyncpg"]["1"]["value"] > 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "bench-reads-uvloop.png",
        "bench-reads.png",
    ]


@needs_bench_group
def test_an_unknown_operation_is_one_line() -> None:
    ran = run_command("orm-async-tests", "bench", "--quick", "--operations", "get_by_name")
    assert ran.code == 2, ran.text
    assert ran.err.startswith("error: no operation get_by_name: one of get_by_pk, ")
    assert ran.err.count("\n") == 1


@needs_bench_group
def test_render_writes_the_same_report_again_from_the_samples(tmp_path: Path) -> None:
    from orm_async_tests.bench import report

    report.write(fake_run(1.0), tmp_path / "a")
    ran = run_command(
        "orm-async-tests",
        "bench",
        "--render",
        str(tmp_path / "a" / "bench.json"),
        "--out",
        str(tmp_path / "b"),
    )
    assert ran.code == 0, ran.text
    first, again = (json.loads((tmp_path / d / "bench.json").read_text()) for d in "ab")
    assert again["geomeans"] == first["geomeans"]
    assert again["cells"] == first["cells"]
    assert (tmp_path / "b" / "bench-reads.png").exists()
    broken = run_command("orm-async-tests", "bench", "--render", str(tmp_path / "none.json"))
    assert broken.code == 2
    assert broken.err.startswith("error: cannot read a run from ")
