"""The lab itself: every comparator can fail, verdicts are honest, and the catalogue,
the console scripts and the imported experiments agree.

A harness whose checks cannot fail would leave every experiment green whatever the
library does; these tests are what turns red then.
"""

from __future__ import annotations

import asyncio
import gc
import math
import tomllib
import types
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from orm_async_tests.db import Database
from orm_async_tests.lab import (
    BadSizes,
    Lab,
    at_least,
    at_most,
    between,
    contains,
    each,
    less_than,
    matches,
    more_than,
    not_,
    one_of,
    prefix,
    where,
)
from orm_async_tests.lab.capture import captured
from orm_async_tests.lab.catalogue import catalogue
from orm_async_tests.lab.cells import Cell, not_here, on, resolve
from orm_async_tests.lab.checks import agrees, make_check, mismatches, shown
from orm_async_tests.lab.registry import Experiment, NoSizes, discover
from orm_async_tests.lab.report import format_report

ROOT = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------ comparators

AGREE: list[tuple[Any, Any]] = [
    (3, 3),
    ("ok", "ok"),
    (2.0, 2),
    (0.1 + 0.2, 0.3),
    (at_least(2), 2),
    (at_least(2), 2.5),
    (at_most(2), 2),
    (more_than(0), 1),
    (less_than(1), 0.5),
    (between(1, 3), 1),
    (between(1, 3), 3),
    (prefix("InterfaceError"), "InterfaceError: boom"),
    (prefix("ValueError"), ValueError("boom")),
    (contains("prepared statement"), "asyncpg: prepared statement x does not exist"),
    (matches(r"^\d+ rows$"), "12 rows"),
    (one_of("a", prefix("b")), "bx"),
    (each(at_most(500)), [500, 500, 3]),
    (not_(0), 1),
    (where("an even number", lambda n: n % 2 == 0), 4),
    ({"users": 3, "points": at_least(1)}, {"users": 3, "points": 7}),
    ([prefix("ok"), 2], ["ok!", 2]),
    ([1, 0, 0, 1], [1, 0, 0, 1]),
    ({"nested": {"a": [1, at_least(2)]}}, {"nested": {"a": [1, 5]}}),
    (set(), set()),
    (None, None),
    ([1, 2], (1, 2)),  # a list and a tuple of the same items
    ([0.3], [0.1 + 0.2]),  # item by item: floats are close
    (not_(5), 6),
    (not_("ok"), "ko"),
]

DISAGREE: list[tuple[Any, Any]] = [
    (3, 4),
    (1, True),  # a bool is not a number
    (True, 1),
    ("ok", "OK"),
    (0.3, 0.31),
    (at_least(2), 1),
    (at_least(1), True),
    (at_least(1), "5"),
    (at_most(2), 3),
    (more_than(0), 0),
    (less_than(1), 1),
    (between(1, 3), 0.99),
    (between(1, 3), 3.01),
    (prefix("InterfaceError"), "InvalidRequestError: boom"),
    (prefix("x"), 5),
    (contains("prepared statement"), "timeout"),
    (matches(r"^\d+ rows$"), "12 rows left"),
    (one_of("a", prefix("b")), "c"),
    (each(at_most(500)), [500, 501]),
    (each(at_most(500)), []),  # "all of nothing" would hold vacuously
    (each(1), "111"),
    (not_(0), 0),
    (where("an even number", lambda n: n % 2 == 0), 3),
    ({"users": 3}, {"users": 2}),
    ({"users": 3}, {"users": 3, "points": 1}),  # an unexpected key
    ({"users": 3, "points": 1}, {"users": 3}),  # a missing key
    ({"users": 3}, 3),
    ([prefix("ok"), 2], ["ok!"]),
    ([prefix("ok"), 2], ["no", 2]),
    ([1, 0, 0, 1], [1, 0, 1, 1]),
    ([0, 1], [False, True]),  # item by item: a bool is not a number
    ({"nested": {"a": [1, at_least(2)]}}, {"nested": {"a": [1, 1]}}),
    (not_(5), None),  # a missing observation is not "another value"
    (not_(5), "6"),
    (float("nan"), float("nan")),
]


@pytest.mark.parametrize(("expected", "observed"), AGREE)
def test_comparators_accept(expected: Any, observed: Any) -> None:
    assert agrees(expected, observed), mismatches(expected, observed)


@pytest.mark.parametrize(("expected", "observed"), DISAGREE)
def test_comparators_refuse(expected: Any, observed: Any) -> None:
    """Each comparator (and the plain, per-key and per-item comparisons) can fail."""
    assert not agrees(expected, observed)
    assert mismatches(expected, observed)


def test_every_comparator_is_exercised_both_ways() -> None:
    """A comparator added to the toolbox without a failing case here fails this test."""
    from orm_async_tests.lab import checks

    made = {type(e).__name__ for e, _ in AGREE + DISAGREE if isinstance(e, checks.Expect)}
    refused = {type(e).__name__ for e, _ in DISAGREE if isinstance(e, checks.Expect)}
    kinds = {
        name
        for name, value in vars(checks).items()
        if isinstance(value, type)
        and issubclass(value, checks.Expect)
        and value is not checks.Expect
    }
    assert made == refused == kinds


def test_the_text_of_a_comparator_is_what_it_tests() -> None:
    assert shown(at_least(1)) == "≥ 1"
    assert shown(between(0.5, 2)) == "0.500 to 2"
    assert shown(prefix("InterfaceError")) == "InterfaceError…"
    assert shown(one_of("ok", prefix("x"))) == "one of: ok | x…"
    assert shown({"users": 3, "points": at_least(1)}) == "users: 3; points: ≥ 1"
    assert shown(where("no row left", lambda x: not x)) == "rule: no row left"
    assert shown(ValueError("two\nlines")) == "ValueError: two"
    with pytest.raises(ValueError, match="rule in words"):
        where("  ", bool)
    for empty in (prefix, contains, matches):
        with pytest.raises(ValueError, match="accepts every text"):
            empty("")
    with pytest.raises(ValueError, match="low bound"):
        between(2, 1)


def test_alike_texts_of_different_values_say_what_differs() -> None:
    assert mismatches(1, "1") == ["expected 1 (int), observed '1' (str)"]


def test_a_check_shows_where_it_fails() -> None:
    check = make_check(
        "s",
        "n",
        "the claim",
        {"users": 3, "errors": []},
        {"users": 2, "errors": ["boom"]},
    )
    assert not check.passed
    assert check.differences == [
        "errors: expected [], observed [boom]",
        "users: expected 3, observed 2",
    ]
    assert [(k, ok) for k, _, _, ok in check.parts] == [("users", False), ("errors", False)]
    ruled = make_check("s", "n", "c", {"a": where("odd", lambda n: n % 2 == 1)}, {"a": 3})
    assert ruled.passed
    assert ruled.rule
    assert not make_check("s", "n", "c", at_least(1), 1).rule


# ----------------------------------------------------------- experiments and verdicts


def stand_in(*scenarios: Any, sizes: type[Any] = NoSizes) -> Experiment[Any]:
    """An experiment that is not registered: its scenarios are the functions given."""
    found: Experiment[Any] = Experiment(900, "stand-in", sizes, __name__, "Does it?", "")
    for body in scenarios:
        found.scenario(body)
    return found


async def holds(lab: Lab[Any]) -> None:
    """One check that holds."""
    lab.check("holds", "1 is 1", expected=1, observed=1)


async def fails(lab: Lab[Any]) -> None:
    """One check that does not hold."""
    lab.check("may fail", "observed matches", expected="a", observed="b")


async def checks_nothing(lab: Lab[Any]) -> None:
    """Observes nothing."""
    lab.figure("a figure is not a check", 1.0, "s")


async def raises(lab: Lab[Any]) -> None:
    """Checks one thing, then breaks."""
    lab.check("holds", "1 is 1", expected=1, observed=1)
    raise ValueError("boom")


async def skips(lab: Lab[Any]) -> None:
    """Cannot run here."""
    lab.skip("no such server here")


async def ruled_out(lab: Lab[Any]) -> None:
    """A hand-written rule that does not hold."""
    lab.check("rule", "odd", expected=where("an odd number", lambda n: n % 2 == 1), observed=2)


async def test_verdicts(database: Database) -> None:
    ok = await stand_in(holds).run(database)
    assert ok.passed
    assert ok.verdict().startswith("PASSED: 1/1")
    bad = await stand_in(holds, fails).run(database)
    assert not bad.passed
    assert [c.name for c in bad.failed] == ["may fail"]
    assert bad.verdict().startswith("FAILED: 1/2")
    rule = await stand_in(holds, ruled_out).run(database)
    assert not rule.passed
    assert "verdict by the rule" in format_report(rule, "db")
    empty = await stand_in(holds, checks_nothing).run(database)
    assert not empty.passed
    assert empty.verdict().startswith("FAILED: scenario 'checks nothing' made no check")
    nothing = await stand_in().run(database)
    assert not nothing.passed


async def test_errors_and_skips(database: Database) -> None:
    broken = await stand_in(raises, holds).run(database)
    assert not broken.passed
    assert broken.verdict() == "ERROR: raises: ValueError: boom (after 2/2 checks hold)"
    assert [s.status for s in broken.scenarios] == ["ERROR", "PASSED"]  # the next one ran
    assert "boom" in format_report(broken, "db", with_traceback=True)
    skipped = await stand_in(skips).run(database)
    assert not skipped.passed
    assert skipped.skipped == "no such server here"
    assert skipped.verdict() == "SKIPPED: no such server here"
    partly = await stand_in(holds, skips).run(database)
    assert partly.passed
    assert partly.skipped is None
    assert partly.verdict() == "PASSED: 1/1 checks hold; skipped 'skips': no such server here"


async def test_only_and_the_report_groups_checks_by_scenario(database: Database) -> None:
    both = stand_in(holds, fails)
    only = await both.run(database, only=["holds"])
    assert only.passed
    assert [s.name for s in only.scenarios] == ["holds"]
    with pytest.raises(TypeError, match="no scenario"):
        await both.run(database, only=["nope"])
    report = format_report(await both.run(database), "the database line")
    assert report.index("── 1. holds") < report.index("1 is 1") < report.index("── 2. fails")
    assert report.index("── 2. fails") < report.index("observed matches")
    assert "FAIL" in report
    assert "the database line" in report


@dataclass(frozen=True)
class Pair:
    low: int = 1
    """The low one."""
    high: int = 2
    """The high one."""

    def __post_init__(self) -> None:
        if self.low > self.high:
            raise BadSizes("low must not exceed high")


async def sees_sizes(lab: Lab[Pair]) -> None:
    """Checks what it was given."""
    lab.check("sizes", "given", expected={"low": 1, "high": 5}, observed=vars(lab.sizes))


async def test_sizes(database: Database) -> None:
    pair = stand_in(sees_sizes, sizes=Pair)
    assert [(f.name, f.default, f.doc) for f in pair.sizes] == [
        ("low", 1, "The low one."),
        ("high", 2, "The high one."),
    ]
    result = await pair.run(database, {"high": 5})
    assert result.passed
    assert result.sizes == {"low": 1, "high": 5}
    with pytest.raises(BadSizes, match="no size"):
        await pair.run(database, {"wide": 3})
    with pytest.raises(BadSizes, match="low must not exceed high"):
        await pair.run(database, {"low": 3})


OPENED: list[str] = []


@asynccontextmanager
async def shared(lab: Lab[Any]) -> AsyncIterator[str]:
    OPENED.append("open")
    yield lab.name("shared")
    OPENED.append("closed")


async def uses_fixture(lab: Lab[Any]) -> None:
    """Uses the shared fixture."""
    lab.check("fixture", "same value", expected=lab.name("shared"), observed=await lab.use(shared))


async def uses_it_again(lab: Lab[Any]) -> None:
    """Uses it once more: not entered twice."""
    lab.check("again", "entered once", expected=["open"], observed=list(OPENED))


async def test_fixtures_are_entered_once_and_exited_after_the_last_scenario(
    database: Database,
) -> None:
    OPENED.clear()
    result = await stand_in(uses_fixture, uses_it_again).run(database)
    assert result.passed, format_report(result, "db")
    assert OPENED == ["open", "closed"]


async def checks_then_skips(lab: Lab[Any]) -> None:
    """Checks something that does not hold, then finds it cannot go on."""
    lab.check("may fail", "observed matches", expected="a", observed="b")
    lab.skip("no such server here")


async def leaks_a_cancellation(lab: Lab[Any]) -> None:
    """Raises the CancelledError of a task it cancelled itself."""
    lab.check("holds", "1 is 1", expected=1, observed=1)
    raise asyncio.CancelledError


@asynccontextmanager
async def checks_in_its_exit(lab: Lab[Any]) -> AsyncIterator[None]:
    yield
    lab.check("counted nowhere", "a fixture's exit is no scenario", expected=1, observed=2)


async def uses_a_checking_fixture(lab: Lab[Any]) -> None:
    """Uses a fixture that checks in its exit."""
    await lab.use(checks_in_its_exit)
    lab.check("holds", "1 is 1", expected=1, observed=1)


async def test_a_skip_does_not_hide_what_went_wrong(database: Database) -> None:
    skipped_late = await stand_in(checks_then_skips).run(database)
    assert skipped_late.skipped is None
    assert not skipped_late.ok
    assert skipped_late.scenarios[0].status == "FAILED"
    assert "observed matches" in format_report(skipped_late, "db")
    leaked = await stand_in(leaks_a_cancellation, holds).run(database)
    assert not leaked.ok
    assert leaked.verdict().startswith("ERROR: leaks a cancellation: CancelledError")
    assert leaked.scenarios[1].status == "PASSED"
    teardown = await stand_in(uses_a_checking_fixture).run(database)
    assert not teardown.ok
    assert teardown.error is not None
    assert "outside a scenario" in teardown.error
    blank = await stand_in(blank_skip).run(database)
    assert not blank.ok
    assert "needs the reason" in blank.verdict()


async def blank_skip(lab: Lab[Any]) -> None:
    """Skips without a reason."""
    lab.skip(" ")


async def test_child_processes_report_what_happened(database: Database) -> None:
    """The one child-process protocol: items as they come (noise on stdout and a crash
    halfway included), a return value, what a child raised or exited with, a timeout."""
    from orm_async_tests.lab import child
    from orm_async_tests.lab.context import Lab as LabType

    from . import child_functions as fn

    lab: LabType[Any] = LabType(database, 900, NoSizes())
    env = {"PYTHONPATH": str(ROOT)}
    crashed = await child.call(lab, fn.noisy_items, 3, within=60, env=env)
    assert (crashed.items, crashed.finished, crashed.ended()) == (
        [0, 1, 2],
        False,
        "killed by SIGABRT",
    )
    assert "noise 0" in crashed.stdout
    returned = await child.call(lab, fn.doubled, 21, within=60, env=env)
    assert (returned.value, returned.ended()) == (42, "exit 0")
    raised = await child.call(lab, fn.raises, within=60, env=env)
    assert (raised.error, raised.ended()) == ("RuntimeError: no", "exit 1")
    exited = await child.call(lab, fn.exits, within=60, env=env)
    assert exited.error == "SystemExit: 3"
    elsewhere = types.FunctionType(fn.doubled.__code__, {}, "doubled")
    elsewhere.__module__ = "tests.no_such_module"
    missing = await child.call(lab, elsewhere, 1, within=60, env=env)
    assert missing.error is not None
    assert missing.error.startswith("ModuleNotFoundError")
    with pytest.raises(TimeoutError, match="did not end within"):
        await child.call(lab, fn.sleeps, within=1, env=env)
    await lab.close()


# ------------------------------------------------------ catalogue, registry, scripts


def test_the_catalogue_reads_what_the_modules_register() -> None:
    """`list` and `testN --help` read the source; the run imports it: the two agree."""
    registered = discover()
    read = catalogue()
    assert sorted(read) == sorted(registered)
    for number, entry in read.items():
        experiment = registered[number]
        assert entry.title == experiment.title
        assert entry.module == experiment.module
        assert entry.question == experiment.question
        assert entry.question.endswith("?")
        assert list(entry.sizes) == experiment.sizes
        assert [name for name, _ in entry.scenarios] == [s.name for s in experiment.scenarios]
        assert [doc for _, doc in entry.scenarios] == [s.doc for s in experiment.scenarios]
        assert all(size.doc for size in entry.sizes), f"{entry.name}: a size without a docstring"
        assert experiment.scenarios, f"{entry.name} has no scenario"


def test_project_scripts_list_exactly_the_experiments() -> None:
    """Adding experiment N needs its `testN` line in pyproject.toml, and nothing else."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    numbered = {name: target for name, target in scripts.items() if name.startswith("test")}
    assert numbered == {e.name: f"orm_async_tests.cli:{e.name}" for e in catalogue().values()}


def test_figures_show_as_numbers() -> None:
    from orm_async_tests.lab.results import Figure

    assert Figure("t", 1.23456, "s").shown() == "1.235 s"
    assert Figure("r", 2.5, "x").shown() == "2.50x"
    assert Figure("n", 1200, "rows").shown() == "1,200 rows"
    assert math.isclose(Figure("f", 0.5, "").value, 0.5)


# ------------------------------------------------------------ expectations per cell

ASYNCPG_21, PSYCOPG_20 = Cell("asyncpg", "2.1"), Cell("psycopg", "2.0")


def test_on_picks_the_expectation_of_the_cell() -> None:
    by_driver = on(asyncpg=1, psycopg=2)
    assert (resolve(by_driver, ASYNCPG_21), resolve(by_driver, PSYCOPG_20)) == (1, 2)
    nested = {"n": on(asyncpg=on(sa20="old", sa21="new"), psycopg="p")}
    assert resolve(nested, ASYNCPG_21) == {"n": "new"}
    assert resolve(nested, Cell("asyncpg", "2.0")) == {"n": "old"}
    assert resolve(nested, PSYCOPG_20) == {"n": "p"}
    assert on(asyncpg=1, psycopg=not_here("x")).texts(shown) == {
        "asyncpg": "1",
        "psycopg": "SKIPPED: x",
    }
    with pytest.raises(ValueError, match="drivers"):
        on(asyncpg=1, sa21=2)
    with pytest.raises(ValueError, match="whole check"):
        resolve({"k": on(asyncpg=1, psycopg=not_here("x"))}, PSYCOPG_20)


def test_a_cell_without_a_stated_expectation_fails() -> None:
    unstated = resolve(on(asyncpg=1), PSYCOPG_20)
    check = make_check("s", "n", "c", unstated, 1)
    assert not check.passed
    assert "no expectation stated for psycopg" in check.expected


async def differs(lab: Lab[Any]) -> None:
    """One check per driver, one meaningless on the other driver."""
    lab.check(
        "per driver",
        "c",
        expected=on(asyncpg=lab.cell.driver, psycopg="psycopg"),
        observed=lab.cell.driver,
    )
    other = "psycopg" if lab.cell.driver == "asyncpg" else "asyncpg"
    lab.check("only one", "c", expected=on(**{lab.cell.driver: 1, other: 2}), observed=1)
    lab.check(
        "not here", "c", expected=on(**{lab.cell.driver: not_here("why"), other: 1}), observed=1
    )


async def all_not_here(lab: Lab[Any]) -> None:
    """Every check means nothing here."""
    lab.check("not here", "c", expected=not_here("never here"), observed=None)


async def test_a_check_skipped_on_a_cell_is_neither_passed_nor_failed(
    database: Database,
) -> None:
    result = await stand_in(differs).run(database)
    assert result.passed
    skipped = [c for c in result.checks if c.skipped is not None]
    assert [(c.name, c.verdict, c.skipped) for c in skipped] == [("not here", "SKIP", "why")]
    assert result.verdict().startswith("PASSED: 2/2 checks hold, 1 skipped on ")
    assert "SKIPPED here: why" in format_report(result, "db")
    per_cell = result.checks[0].per_cell
    assert (sorted(per_cell), per_cell["psycopg"]) == (["asyncpg", "psycopg"], "psycopg")
    nothing = await stand_in(all_not_here).run(database)
    assert not nothing.passed
    assert nothing.skipped == "never here"
    assert nothing.verdict() == "SKIPPED: never here"


def test_progress_prints_each_step_with_or_without_a_bar(capsys: Any) -> None:
    from orm_async_tests.lab.progress import Progress

    for live in (False, True):
        with Progress(3, live=live) as progress:
            progress.start("cell run 1/1 test1")
            progress.done("cell run 1/1 test1: PASSED")
            progress.done("other cell: cannot run", steps=2)
        out = capsys.readouterr().out
        assert "test1: PASSED" in out, live
        assert "other cell: cannot run" in out, live


class _WarnsWhenCollected:
    """A reference cycle whose ``__del__`` warns, as a dropped driver connection does."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.me = self

    def __del__(self) -> None:
        warnings.warn(f"{self.label} was deleted while still open", ResourceWarning, stacklevel=1)


def test_captured_records_what_the_block_leaves_not_what_came_before() -> None:
    """Garbage from before the block is collected first, unrecorded (a random earlier
    test's leak must not fail an experiment's "no warning" check); the block's own
    garbage is collected at its end and recorded."""
    gc.disable()
    try:
        _WarnsWhenCollected("before")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with captured() as got:
                _WarnsWhenCollected("inside")
    finally:
        gc.enable()
    assert [str(w.message) for w in got.caught] == ["inside was deleted while still open"]
