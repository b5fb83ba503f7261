"""A run as JSON and as Markdown: medians (min-max), ratios per operation, geometric means.

Ratios are of medians, in operations per second: ``best/asyncpg = 0.62x`` means
the best SQLAlchemy pattern did 62 % of raw asyncpg's operations per second;
``best/naive = 3.1x`` that it did 3.1 times as many as the naive ORM code. A
geometric mean is taken over the operations where both cells have a number.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .runner import Cell
from .stats import DASH, TIMES, Summary, geomean, number, ratio, times
from .suite import BenchRun

ASYNCPG, NAIVE, BEST, TORTOISE = "asyncpg", "sqlalchemy_naive", "sqlalchemy_best", "tortoise"

RATIOS: dict[str, tuple[str, str]] = {
    "best/asyncpg": (BEST, ASYNCPG),
    "best/tortoise": (BEST, TORTOISE),
    "naive/asyncpg": (NAIVE, ASYNCPG),
    "naive/tortoise": (NAIVE, TORTOISE),
    "best/naive": (BEST, NAIVE),
    "tortoise/asyncpg": (TORTOISE, ASYNCPG),
}
"""Each ratio's name → (numerator, denominator) implementation."""

TABLE_RATIOS = ("best/asyncpg", "best/tortoise", "naive/asyncpg", "naive/tortoise", "best/naive")
RATIO_TITLES = {
    "best/asyncpg": "best SA / asyncpg",
    "best/tortoise": "best SA / Tortoise",
    "naive/asyncpg": "naive SA / asyncpg",
    "naive/tortoise": "naive SA / Tortoise",
    "best/naive": "best SA / naive SA",
    "tortoise/asyncpg": "Tortoise / asyncpg",
}


def summary_of(run: BenchRun, operation: str, implementation: str, level: int) -> Summary | None:
    cell = run.cell(operation, implementation, level)
    return cell.summary if cell is not None else None


def ratios(run: BenchRun, operation: str, level: int) -> dict[str, float | None]:
    return {
        name: ratio(
            summary_of(run, operation, top, level), summary_of(run, operation, bottom, level)
        )
        for name, (top, bottom) in RATIOS.items()
    }


def geomeans(run: BenchRun, level: int) -> dict[str, float | None]:
    per_op = [ratios(run, op, level) for op in run.meta["operations"]]
    return {name: geomean(r[name] for r in per_op) for name in RATIOS}


def to_json(run: BenchRun) -> dict[str, Any]:
    def cell(c: Cell) -> dict[str, Any]:
        s = c.summary
        return {
            **asdict(c),
            "median": s.median if s else None,
            "min": s.low if s else None,
            "max": s.high if s else None,
        }

    levels = run.concurrency
    return {
        "meta": run.meta,
        "cells": [cell(c) for c in run.cells],
        "ratios": {
            str(level): {op: ratios(run, op, level) for op in run.meta["operations"]}
            for level in levels
        },
        "geomeans": {str(level): geomeans(run, level) for level in levels},
    }


def headline(run: BenchRun) -> str:
    m = run.meta
    v = m["versions"]
    mode = "quick run" if m["quick"] else "full run"
    plan = m["plan"]
    return (
        f"{m['date'][:10]} · PostgreSQL {m['postgresql']} ({m['database']}) · "
        f"Python {v['python']} · SQLAlchemy {v['sqlalchemy']} · asyncpg {v['asyncpg']} · "
        f"tortoise-orm {v['tortoise-orm']} · {m['cpus']} CPUs · {mode}: "
        f"{plan['repeats']} timed runs of ~{plan['target']} s per cell, "
        f"{m.get('seconds', '?')} s in all"
    )


def markdown(run: BenchRun, *, title: str = "Benchmark") -> str:
    m = run.meta
    impls: dict[str, str] = m["implementations"]
    out = [f"# {title}", "", headline(run), ""]
    out.append(
        f"Operations per second: median of the timed runs (min{DASH}max). Ratios are of "
        f"medians: `best/asyncpg 0.500{TIMES}` = half of raw asyncpg's rate; "
        f"`best/naive 3.00{TIMES}` = three times the naive ORM code's."
    )
    for level in run.concurrency:
        out += ["", f"## Concurrency {level}", ""]
        head = ["operation", *impls.values(), *TABLE_RATIOS]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for op, info in m["operations"].items():
            cells = []
            for key in impls:
                cell = run.cell(op, key, level)
                s = cell.summary if cell is not None else None
                cells.append(s.shown() if s else "**failed**")
            r = ratios(run, op, level)
            out.append(
                "| "
                + " | ".join([info["title"], *cells, *(times(r[n]) for n in TABLE_RATIOS)])
                + " |"
            )
        g = geomeans(run, level)
        filler = [""] * len(impls)
        out.append(
            "| "
            + " | ".join(
                ["**geometric mean**", *filler, *(f"**{times(g[n])}**" for n in TABLE_RATIOS)]
            )
            + " |"
        )
    out += ["", "## Geometric means over the operations", ""]
    out.append("| ratio | " + " | ".join(f"concurrency {lv}" for lv in run.concurrency) + " |")
    out.append("|---|" + "---|" * len(run.concurrency))
    all_g = {lv: geomeans(run, lv) for lv in run.concurrency}
    for name in RATIOS:
        out.append(
            f"| {RATIO_TITLES[name]} | "
            + " | ".join(times(all_g[lv][name]) for lv in run.concurrency)
            + " |"
        )
    out += ["", "## What each cell runs", ""]
    patterns: dict[str, dict[str, str]] = m["patterns"]
    for op, info in m["operations"].items():
        out.append(f"- **{info['title']}** — {info['one_op']}:")
        for key, label in impls.items():
            out.append(f"  - {label}: {patterns.get(key, {}).get(op, DASH)}")
    if run.failed:
        out += ["", "## Failed cells", ""]
        for c in run.failed:
            out.append(
                f"- {m['operations'][c.operation]['title']} · {impls[c.implementation]} · "
                f"concurrency {c.concurrency}: {c.error}"
            )
    out.append("")
    return "\n".join(out)


def write(run: BenchRun, directory: Path) -> list[Path]:
    """``bench.json`` and ``bench.md`` in ``directory`` (created); their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / "bench.json"
    md_path = directory / "bench.md"
    json_path.write_text(json.dumps(to_json(run), indent=2) + "\n", encoding="utf-8")
    md_path.write_text(markdown(run), encoding="utf-8")
    return [json_path, md_path]


def short_table(run: BenchRun) -> list[list[str]]:
    """Rows for the console: operation, concurrency, the four medians, best/asyncpg, best/naive."""
    rows = []
    for op, info in run.meta["operations"].items():
        for level in run.concurrency:
            medians = []
            for key in run.meta["implementations"]:
                s = summary_of(run, op, key, level)
                medians.append(number(s.median) if s else "failed")
            r = ratios(run, op, level)
            rows.append(
                [
                    info["title"],
                    str(level),
                    *medians,
                    times(r["best/asyncpg"]),
                    times(r["best/naive"]),
                ]
            )
    return rows
