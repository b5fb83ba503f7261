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
    reported = {e["number"]: e for e in findings["experiments"]}
    assert sorted(reported) == sorted(catalogue())
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
    for exp in findings["experiments"]:
        for scenario in exp["scenarios"]:
            if all(scenario["skipped"]):
                continue
            assert not any(scenario["errors"]), (exp["name"], scenario["name"])
            assert scenario["checks"], (exp["name"], scenario["name"])
            for check in scenario["checks"]:
                assert check["passed"] == [True] * findings["runs"], (exp["name"], check)


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
