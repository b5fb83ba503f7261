"""The docs site's generated pages are what the committed report and the experiments
say today, and mkdocs.yml lists every experiment's page."""

from __future__ import annotations

import json
import re
from pathlib import Path

from orm_async_tests.lab.site import nav, pages

ROOT = Path(__file__).resolve().parent.parent


def test_every_generated_page_is_up_to_date() -> None:
    data = json.loads((ROOT / "findings" / "findings.json").read_text())
    for name, text in pages(data).items():
        path = ROOT / "docs" / name
        assert path.exists(), f"docs/{name} is missing: run `nox -s report`"
        assert path.read_text() == text, f"docs/{name} is out of date: run `nox -s report`"


def test_mkdocs_lists_every_experiment_page() -> None:
    listed = re.findall(
        r"^\s+- (experiments/test\d+\.md)$", (ROOT / "mkdocs.yml").read_text(), re.M
    )
    assert listed == nav()
