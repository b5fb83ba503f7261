"""Every experiment, run on the test database: each of its checks must hold.

A check that fails here means SQLAlchemy, the driver or PostgreSQL now behaves
differently from what the experiment states: the report in the failure
message says which observation changed.
"""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from orm_async_tests.cli import discover, format_report
from orm_async_tests.db import Database
from orm_async_tests.harness import Experiment, Lab
from orm_async_tests.models import Group, Job, User

EXPERIMENTS = discover()


@pytest.mark.parametrize("number", sorted(EXPERIMENTS))
async def test_experiment_checks_hold_and_it_cleans_up(database: Database, number: int) -> None:
    """Every check holds, and no row of the run is left behind (so a second run, or the
    suite run twice in a row as CI does, meets a clean table)."""
    experiment = EXPERIMENTS[number]
    result = await experiment.run(database)
    if result.skipped is not None:
        pytest.skip(f"{experiment.name}: {result.skipped}")
    report = format_report(result, database, await database.server_version(), with_traceback=True)
    assert result.passed, report
    async with database.sessions() as session:
        left = [
            await session.scalar(select(func.count()).where(tagged.like(f"e{number}-%")))
            for tagged in (User.username, Group.name, Job.queue)
        ]
    assert left == [0, 0, 0]


async def _two_checks(lab: Lab, *, fail: bool = False) -> None:
    """A stand-in experiment with one check that holds and one that may not."""
    lab.check("holds", "1 is 1", expected=1, observed=1)
    lab.check("may fail", "observed matches", expected="a", observed="b" if fail else "a")


async def _no_checks(lab: Lab) -> None:
    """Observes nothing."""


async def test_harness_verdicts(database: Database) -> None:
    ok = await Experiment(901, "ok", _two_checks, {"fail": False}).run(database)
    bad = await Experiment(902, "bad", _two_checks, {"fail": False}).run(database, fail=True)
    empty = await Experiment(903, "empty", _no_checks).run(database)
    assert ok.passed
    assert ok.verdict().startswith("PASSED: 2/2")
    assert not bad.passed
    assert [c.name for c in bad.failed] == ["may fail"]
    assert bad.verdict().startswith("FAILED: 1/2")
    assert not empty.passed
    assert "no check" in empty.verdict()
    report = format_report(bad, database, "18")
    assert "FAIL" in report
    assert "may fail" in report
    assert "observed matches" in report
    with pytest.raises(TypeError, match="no parameter"):
        await Experiment(904, "x", _two_checks, {"fail": False}).run(database, size=3)


async def _raises(lab: Lab) -> None:
    """Checks one thing, then breaks."""
    lab.check("holds", "1 is 1", expected=1, observed=1)
    raise ValueError("boom")


async def _skips(lab: Lab) -> None:
    """Cannot run here."""
    lab.skip("no such server here")


async def test_harness_errors_and_skips(database: Database) -> None:
    broken = await Experiment(905, "broken", _raises).run(database)
    assert not broken.passed
    assert broken.verdict() == "ERROR: ValueError: boom (after 1/1 checks hold)"
    assert broken.traceback is not None
    assert "boom" in format_report(broken, database, "18", with_traceback=True)
    skipped = await Experiment(906, "skipped", _skips).run(database)
    assert not skipped.passed
    assert skipped.verdict() == "SKIPPED: no such server here"
