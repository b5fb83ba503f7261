"""Every experiment, run once on the test database: each of its checks must hold.

A check that fails here means SQLAlchemy, the driver or PostgreSQL now behaves
differently from what the experiment states: the report in the failure message
says which observation changed. An experiment (or a scenario) that cannot run
here is reported as skipped, with its reason, never as passed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import func, select

from orm_async_tests.db import Database
from orm_async_tests.lab.catalogue import catalogue
from orm_async_tests.lab.registry import load
from orm_async_tests.lab.report import format_report
from orm_async_tests.lab.results import Result
from orm_async_tests.lab.runner import database_line
from orm_async_tests.models import Group, Job, User
from orm_async_tests.settings import ASYNC_DRIVERS

ENTRIES = catalogue()
FINDINGS = Path(__file__).resolve().parent.parent / "findings" / "findings.json"


def assert_findings_are_current(name: str, driver: str, result: Result) -> None:
    """The committed findings name the checks this run made, with the same claims: a check
    added, renamed or reworded needs `nox -s report` again (the README publishes them)."""
    cells = json.loads(FINDINGS.read_text())["cells"]
    cell = next(c for c in cells if c["key"].startswith(f"{driver}/") and c["experiments"])
    published = {e["name"]: e for e in cell["experiments"]}[name]
    by_scenario = {s["name"]: s for s in published["scenarios"]}
    for part in result.ran:
        made = [(c.name, c.claim) for c in part.checks]
        found = [(c["name"], c["claim"]) for c in by_scenario[part.name]["checks"]]
        assert made == found, f"{name} {part.name}: findings/ is out of date: run `nox -s report`"


@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
@pytest.mark.parametrize("number", sorted(ENTRIES), ids=[e.name for e in ENTRIES.values()])
async def test_experiment_checks_hold_and_it_cleans_up(
    databases: dict[str, Database], number: int, driver: str
) -> None:
    """Every check holds on each driver, and no row of the run is left behind (so a second
    run, or the suite run twice in a row as CI does, meets a clean table)."""
    database = databases[driver]
    experiment = load(ENTRIES[number].module)
    result = await experiment.run(database)
    line = database_line(database, await database.server_version())
    report = format_report(result, line, with_traceback=True)
    async with database.sessions() as session:
        left = [
            await session.scalar(select(func.count()).where(tagged.like(f"e{number}-%")))
            for tagged in (User.username, Group.name, Job.queue)
        ]
    assert left == [0, 0, 0], f"rows left behind (users, groups, jobs): {left}"
    if result.skipped is not None:
        pytest.skip(f"{experiment.name}: {result.skipped}")
    assert result.passed, report
    assert_findings_are_current(experiment.name, driver, result)
    reasons = [f"{s.title}: {s.skip_reason}" for s in result.skipped_scenarios]
    reasons += [f"{c.name}: {c.skipped}" for c in result.checks if c.skipped is not None]
    if reasons:
        pytest.skip(f"{experiment.name}: {result.verdict()} (skipped {'; '.join(reasons)})")
