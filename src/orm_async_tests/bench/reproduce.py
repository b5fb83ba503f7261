"""Does a figure reproduce? A cell measured twice, and two whole runs compared.

- :func:`repeat_check` (``bench --repeat-check``): the same cells run twice, one run
  after the other; each cell's two medians are shown with their 95 % intervals. A
  cell whose two intervals do not overlap did not reproduce (exit 1).
- :func:`compare_files` (``bench --compare A.json B.json``): every geometric mean
  that both runs have, A's and B's with their intervals, and B's distance from A.
  The published figures (docs/bench/, README's block) come from a run A that a run
  B on the same machine reproduces within :data:`TOLERANCE` on every geometric
  mean; more than that: exit 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ..errors import SetupError
from .report import RATIOS
from .stats import DASH, TIMES, Estimate, number
from .suite import BenchRun

TOLERANCE = 0.10
README_START, README_END = "<!-- bench: start -->", "<!-- bench: end -->"
SUMMARY_RATIOS = ("core/asyncpg", "orm/tortoise", "orm/piccolo", "naive/asyncpg", "psycopg/asyncpg")


def overlap(a_low: float, a_high: float, b_low: float, b_high: float) -> bool:
    return a_low <= b_high and b_low <= a_high


def repeat_check(first: BenchRun, second: BenchRun, console: Console) -> int:
    """Each cell of ``first`` beside the same cell of ``second``; 1 when two intervals are
    disjoint (or a cell failed), else 0."""
    table = Table(title="the same cells, run twice", title_justify="left")
    for name in ("operation", "implementation", "c", "loop", "run 1", "run 2", "2 / 1", "verdict"):
        table.add_column(name)
    bad = 0
    for a in first.cells:
        b = second.cell(a.operation, a.implementation, a.concurrency, a.loop)
        sa, sb = a.summary, b.summary if b is not None else None
        if sa is None or sb is None:
            bad += 1
            verdict = "failed"
            shown = [DASH, DASH, DASH]
        else:
            same = overlap(sa.low, sa.high, sb.low, sb.high)
            inside = sa.low <= sb.median <= sa.high and sb.low <= sa.median <= sb.high
            bad += not same
            verdict = "each inside the other" if inside else "overlap" if same else "DISJOINT"
            shown = [sa.shown(), sb.shown(), f"{number(sb.median / sa.median)}{TIMES}"]
        table.add_row(
            first.meta["operations"][a.operation]["title"],
            first.meta["implementations"][a.implementation],
            str(a.concurrency),
            a.loop,
            *shown,
            verdict,
        )
    console.print(table)
    console.print(
        f"{len(first.cells) - bad} of {len(first.cells)} cells reproduced "
        "(their two 95 % intervals overlap)"
    )
    return 1 if bad else 0


def _geomeans(data: dict[str, Any]) -> dict[tuple[str, int, str], Estimate]:
    found = {}
    for loop, levels in data["geomeans"].items():
        for level, names in levels.items():
            for name, e in names.items():
                if e is not None:
                    found[(loop, int(level), name)] = Estimate(**e)
    return found


def _load(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SetupError(f"cannot read {path}: {exc}") from exc
    if "geomeans" not in data or "meta" not in data:
        raise SetupError(f"{path} is not a bench.json written by `orm-async-tests bench`")
    return data


def comparison(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Every geometric mean in both runs: A's, B's, B/A - 1, within the tolerance."""
    ga, gb = _geomeans(a), _geomeans(b)
    rows = []
    for key in ga:
        if key in gb:
            loop, level, name = key
            diff = gb[key].value / ga[key].value - 1
            rows.append(
                {
                    "loop": loop,
                    "concurrency": level,
                    "ratio": name,
                    "a": ga[key],
                    "b": gb[key],
                    "difference": diff,
                    "within": abs(diff) <= TOLERANCE,
                }
            )
    return rows


def markdown(rows: list[dict[str, Any]], a: dict[str, Any], b: dict[str, Any]) -> str:
    worst = max((abs(r["difference"]) for r in rows), default=0.0)
    outside = sum(not r["within"] for r in rows)
    out = [
        "# Reproduction",
        "",
        f"Run A ({a['meta']['date']}, {a['meta']['seconds']} s) is the published one; run B "
        f"({b['meta']['date']}, {b['meta']['seconds']} s) ran after it on the same machine "
        "and the same server, with the same command. Every geometric mean of both, and B's "
        f"distance from A: {len(rows) - outside} of {len(rows)} within ±{TOLERANCE:.0%}, "
        f"the largest {worst:.1%}. Written by `orm-async-tests bench --compare A.json B.json`.",
        "",
        "| loop | c | ratio | A | B | B / A − 1 |",  # noqa: RUF001
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        flag = "" if r["within"] else " **(beyond ±10 %)**"
        out.append(
            f"| {r['loop']} | {r['concurrency']} | {RATIOS[r['ratio']].title} | "
            f"{r['a'].shown()} | {r['b'].shown()} | {r['difference']:+.1%}{flag} |"
        )
    out.append("")
    return "\n".join(out)


def readme_block(rows: list[dict[str, Any]], a: dict[str, Any]) -> str:
    """The README's summary: the headline geometric means of A, and how B reproduced them."""
    loops = list(a["geomeans"])
    levels = sorted({r["concurrency"] for r in rows})
    columns = [(loop, lv) for loop in loops for lv in levels]
    index = {(r["loop"], r["concurrency"], r["ratio"]): r for r in rows}
    worst = max((abs(r["difference"]) for r in rows), default=0.0)
    v = a["meta"]["versions"]
    out = [
        README_START,
        "",
        f"Geometric means over {len(a['meta']['operations'])} operations, with 95 % intervals "
        f"({a['meta']['date'][:10]}, PostgreSQL {a['meta']['postgresql']}, SQLAlchemy "
        f"{v['sqlalchemy']}, {a['meta']['cpus']} CPUs; a second run reproduced every geometric "
        f"mean within {worst:.1%}: [reproduction](docs/bench/reproduction.md)):",
        "",
        "| ratio | " + " | ".join(f"{loop}, c={lv}" for loop, lv in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for name in SUMMARY_RATIOS:
        cells = [index.get((loop, lv, name)) for loop, lv in columns]
        if all(c is None for c in cells):
            continue
        out.append(
            f"| {RATIOS[name].title} | "
            + " | ".join(DASH if c is None else c["a"].shown() for c in cells)
            + " |"
        )
    out += ["", README_END]
    return "\n".join(out)


def write_readme(path: Path, block: str) -> None:
    text = path.read_text(encoding="utf-8")
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise SetupError(f"{path} has no {README_START} … {README_END} block")
    path.write_text(text[:start] + block + text[end + len(README_END) :], encoding="utf-8")


def compare_files(paths: list[Path], out: Path, readme: str | None, console: Console) -> int:
    if len(paths) != 2:
        raise SetupError("--compare takes two bench.json files: the run to publish, and its repeat")
    a, b = (_load(p) for p in paths)
    rows = comparison(a, b)
    if not rows:
        raise SetupError(f"{paths[0]} and {paths[1]} have no geometric mean in common")
    table = Table(title=f"{paths[1]} against {paths[0]}", title_justify="left")
    for name in ("loop", "c", "ratio", "A", "B", "B / A − 1"):  # noqa: RUF001
        table.add_column(name)
    for r in rows:
        table.add_row(
            r["loop"],
            str(r["concurrency"]),
            RATIOS[r["ratio"]].title,
            r["a"].shown(),
            r["b"].shown(),
            f"{r['difference']:+.1%}" + ("" if r["within"] else " (beyond ±10 %)"),
        )
    console.print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reproduction.md").write_text(markdown(rows, a, b), encoding="utf-8")
    if readme:
        write_readme(Path(readme), readme_block(rows, a))
    outside = [r for r in rows if not r["within"]]
    console.print(
        f"{len(rows) - len(outside)} of {len(rows)} geometric means within ±{TOLERANCE:.0%}"
    )
    return 1 if outside else 0
