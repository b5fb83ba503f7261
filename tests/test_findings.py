"""The committed findings (``findings/``) and the README's block are what the
experiments say today: a question, a scenario or a check changed without running
``orm-async-tests report`` again (``nox -s report``) fails here."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from orm_async_tests.lab.catalogue import catalogue
from orm_async_tests.lab.findings import (
    README_BEGIN,
    README_END,
    readme_block,
    render_markdown,
    replace_block,
)

ROOT = Path(__file__).resolve().parent.parent
FINDINGS = ROOT / "findings"


@pytest.fixture(scope="module")
def findings() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FINDINGS / "findings.json").read_text())
    return data


def test_findings_describe_every_experiment_as_it_is(findings: dict[str, Any]) -> None:
    cells = [c for c in findings["cells"] if not c.get("cannot_run")]
    assert {c["key"].split("/")[0] for c in cells} == {"asyncpg", "psycopg"}
    for cell in cells:
        check_cell_describes_the_catalogue(cell)


def check_cell_describes_the_catalogue(cell: dict[str, Any]) -> None:
    reported = {e["number"]: e for e in cell["experiments"]}
    assert sorted(reported) == sorted(catalogue()), cell["key"]
    for number, entry in catalogue().items():
        exp = reported[number]
        assert (exp["name"], exp["title"], exp["question"]) == (
            entry.name,
            entry.title,
            entry.question,
        ), f"{entry.name}: run `nox -s report` again"
        assert [(s["name"], s["doc"]) for s in exp["scenarios"]] == list(entry.scenarios), (
            f"{entry.name}: its scenarios changed; run `nox -s report` again"
        )
        assert exp["sizes"] == {s.name: s.default for s in entry.sizes}


def test_the_committed_report_held_in_every_run(findings: dict[str, Any]) -> None:
    """What the README publishes held in every run of the report (a skipped scenario is
    shown as skipped, with its reason)."""
    assert findings["runs"] >= 2
    for cell in findings["cells"]:
        for exp in cell["experiments"]:
            for scenario in exp["scenarios"]:
                if all(scenario["skipped"]):
                    continue
                where = (cell["key"], exp["name"], scenario["name"])
                assert not any(scenario["errors"]), where
                assert scenario["checks"], where
                for check in scenario["checks"]:
                    if check.get("skipped"):
                        assert check["passed"] == [None] * cell["runs"], (where, check)
                        continue
                    assert check["passed"] == [True] * cell["runs"], (where, check)


def test_findings_md_and_the_readme_are_rendered_from_the_json(findings: dict[str, Any]) -> None:
    assert (FINDINGS / "findings.md").read_text() == render_markdown(findings)
    readme = (ROOT / "README.md").read_text()
    block = readme_block(findings, "findings/findings.md")
    assert replace_block(readme, block) == readme, "run `nox -s report` again"


def test_no_count_is_typed_by_hand_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    outside = readme[: readme.index(README_BEGIN)] + readme[readme.index(README_END) :]
    typed = re.findall(r"\b\d+ (?:experiments|checks|scenarios)\b", outside)
    assert typed == [], f"hand-typed counts in README.md: {typed}"


def test_merge_joins_the_cells_of_several_reports_and_fails_on_a_failed_one(
    findings: dict[str, Any], tmp_path: Path, capsys: Any
) -> None:
    from orm_async_tests.lab.runner import merge_reports
    from orm_async_tests.lab.scripts import EXIT_FAILED, EXIT_OK

    cells = [c for c in findings["cells"] if not c.get("cannot_run")]
    external = json.loads(json.dumps(cells[0]))
    external["key"] = external["key"].rsplit("/", 1)[0] + "/external"
    parts = []
    for i, part in enumerate(([*cells[1:]], [cells[0], external])):
        path = tmp_path / f"part{i}.json"
        path.write_text(json.dumps({**findings, "cells": part}))
        parts.append(path)
    assert merge_reports(parts, tmp_path / "out", None, "nox -s matrix") == EXIT_OK
    merged = json.loads((tmp_path / "out" / "findings.json").read_text())
    assert [c["key"] for c in merged["cells"]] == [c["key"] for c in cells] + [external["key"]]
    assert merged["command"] == "nox -s matrix on each server (embedded, external), merged"

    external["experiments"][0]["verdicts"][0] = "FAILED: 0/1 checks hold"
    parts[1].write_text(json.dumps({**findings, "cells": [external]}))
    assert merge_reports(parts, tmp_path / "out", None, "nox -s matrix") == EXIT_FAILED
    assert "not passed:" in capsys.readouterr().out
