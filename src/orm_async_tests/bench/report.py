"""A run as JSON and as Markdown: medians with intervals, ratios, geometric means, the goals.

Ratios are of medians, in operations per second: ``core/asyncpg = 0.62x`` means
SA best Core did 62 % of raw asyncpg's operations per second. Each figure comes
with its 95 % interval (:mod:`.stats`). A geometric mean is taken over the
operations where both cells have a number. :func:`analyse` computes every
estimate once; the Markdown, the console and the JSON read it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

from .runner import Cell
from .stats import DASH, TIMES, Estimate, Summary, geomean_of, ratio
from .suite import BenchRun

ASYNCPG, PSYCOPG, TORTOISE, PICCOLO = "asyncpg", "psycopg", "tortoise", "piccolo"
NAIVE, BEST, ORM = "sqlalchemy_naive", "sqlalchemy_best", "sqlalchemy_orm"
BEST_PSYCOPG, ORM_PSYCOPG = f"{BEST}_psycopg", f"{ORM}_psycopg"


class RatioOf(NamedTuple):
    numerator: str
    denominator: str
    title: str


RATIOS: dict[str, RatioOf] = {
    "core/asyncpg": RatioOf(BEST, ASYNCPG, "SA best Core / asyncpg"),
    "orm/tortoise": RatioOf(ORM, TORTOISE, "SA best ORM / Tortoise"),
    "orm/piccolo": RatioOf(ORM, PICCOLO, "SA best ORM / Piccolo"),
    "orm/asyncpg": RatioOf(ORM, ASYNCPG, "SA best ORM / asyncpg"),
    "naive/asyncpg": RatioOf(NAIVE, ASYNCPG, "SA naive / asyncpg"),
    "naive/tortoise": RatioOf(NAIVE, TORTOISE, "SA naive / Tortoise"),
    "core/naive": RatioOf(BEST, NAIVE, "SA best Core / SA naive"),
    "core_psycopg/psycopg": RatioOf(BEST_PSYCOPG, PSYCOPG, "SA best Core / psycopg (on psycopg)"),
    "orm_psycopg/orm": RatioOf(ORM_PSYCOPG, ORM, "SA best ORM on psycopg / on asyncpg"),
    "psycopg/asyncpg": RatioOf(PSYCOPG, ASYNCPG, "psycopg / asyncpg"),
    "tortoise/asyncpg": RatioOf(TORTOISE, ASYNCPG, "Tortoise / asyncpg"),
    "piccolo/asyncpg": RatioOf(PICCOLO, ASYNCPG, "Piccolo / asyncpg"),
}
"""Each ratio's name → (numerator, denominator, title)."""

TABLE_RATIOS = ("core/asyncpg", "orm/tortoise", "orm/piccolo", "naive/asyncpg", "psycopg/asyncpg")
"""The ratio columns of each concurrency level's table (every ratio is in the JSON)."""


class Goal(NamedTuple):
    ratio: str
    target: float
    on: str
    """``geomean``: the geometric mean must reach it; ``every``: every operation must."""


GOALS = (
    Goal("core/asyncpg", 0.7, "geomean"),
    Goal("orm/tortoise", 1.0, "every"),
    Goal("orm/piccolo", 1.0, "every"),
)
"""Issue 12's goals (benchmarked, never a timed test)."""


@dataclass(frozen=True)
class Analysis:
    """Every estimate of a run: ``ratios[loop][level][op][name]``, ``geomeans[loop][level][name]``,
    and ``loop_ratios[impl][level]`` (the second loop over the first, geometric mean)."""

    ratios: dict[str, dict[int, dict[str, dict[str, Estimate | None]]]]
    geomeans: dict[str, dict[int, dict[str, Estimate | None]]]
    loop_ratios: dict[str, dict[int, Estimate | None]]


def summary_of(
    run: BenchRun, operation: str, implementation: str, level: int, loop: str = "asyncio"
) -> Summary | None:
    cell = run.cell(operation, implementation, level, loop)
    return cell.summary if cell is not None else None


def analyse(run: BenchRun) -> Analysis:
    ops = list(run.meta["operations"])
    present = [n for n, r in RATIOS.items() if {r.numerator, r.denominator} <= _impls(run)]
    ratios: dict[str, dict[int, dict[str, dict[str, Estimate | None]]]] = {}
    geomeans: dict[str, dict[int, dict[str, Estimate | None]]] = {}
    for loop in run.loops:
        ratios[loop], geomeans[loop] = {}, {}
        for level in run.concurrency:

            def pair(op: str, name: str) -> tuple[Summary | None, Summary | None]:
                r = RATIOS[name]
                return (
                    summary_of(run, op, r.numerator, level, loop),  # noqa: B023
                    summary_of(run, op, r.denominator, level, loop),  # noqa: B023
                )

            ratios[loop][level] = {op: {n: ratio(*pair(op, n)) for n in present} for op in ops}
            geomeans[loop][level] = {n: geomean_of(pair(op, n) for op in ops) for n in present}
    loop_ratios: dict[str, dict[int, Estimate | None]] = {}
    if len(run.loops) > 1:
        first, second = run.loops[:2]
        for impl in run.meta["implementations"]:

            def across(
                op: str, level: int, impl: str = impl
            ) -> tuple[Summary | None, Summary | None]:
                return (
                    summary_of(run, op, impl, level, second),
                    summary_of(run, op, impl, level, first),
                )

            # the loops ran one after the other: not paired
            loop_ratios[impl] = {
                level: geomean_of([across(op, level) for op in ops], paired=False)
                for level in run.concurrency
            }
    return Analysis(ratios, geomeans, loop_ratios)


def _impls(run: BenchRun) -> set[str]:
    return set(run.meta["implementations"])


def _estimate(e: Estimate | None) -> dict[str, float] | None:
    return None if e is None else asdict(e)


def to_json(run: BenchRun, analysis: Analysis) -> dict[str, Any]:
    def cell(c: Cell) -> dict[str, Any]:
        s = c.summary
        return {
            **asdict(c),
            "median": s.median if s else None,
            "low": s.low if s else None,
            "high": s.high if s else None,
        }

    return {
        "meta": run.meta,
        "cells": [cell(c) for c in run.cells],
        "ratios": {
            loop: {
                str(level): {
                    op: {n: _estimate(e) for n, e in per_op.items()} for op, per_op in ops.items()
                }
                for level, ops in levels.items()
            }
            for loop, levels in analysis.ratios.items()
        },
        "geomeans": {
            loop: {
                str(level): {n: _estimate(e) for n, e in names.items()}
                for level, names in levels.items()
            }
            for loop, levels in analysis.geomeans.items()
        },
        "loop_ratios": {
            impl: {str(level): _estimate(e) for level, e in levels.items()}
            for impl, levels in analysis.loop_ratios.items()
        },
        "goals": goals(run, analysis),
    }


def goals(run: BenchRun, analysis: Analysis) -> list[dict[str, Any]]:
    """Each goal on each loop and level: met or not, by how much, and where it is missed."""
    found = []
    for goal in GOALS:
        for loop in run.loops:
            for level in run.concurrency:
                g = analysis.geomeans[loop][level].get(goal.ratio)
                if g is None:
                    continue
                per_op = {
                    op: e
                    for op, names in analysis.ratios[loop][level].items()
                    if (e := names.get(goal.ratio)) is not None
                }
                missed = {op: asdict(e) for op, e in per_op.items() if e.value < goal.target}
                met = g.value >= goal.target if goal.on == "geomean" else not missed
                found.append(
                    {
                        "ratio": goal.ratio,
                        "target": goal.target,
                        "on": goal.on,
                        "loop": loop,
                        "concurrency": level,
                        "geomean": asdict(g),
                        "met": met,
                        "missed_on": missed,
                    }
                )
    return found


def headline(run: BenchRun) -> str:
    m = run.meta
    v = m["versions"]
    mode = "quick run" if m["quick"] else "full run"
    plan = m["plan"]
    return (
        f"{m['date'][:10]} · PostgreSQL {m['postgresql']} ({m['database']}) · "
        f"Python {v['python']} · SQLAlchemy {v['sqlalchemy']} · asyncpg {v['asyncpg']} · "
        f"psycopg {v['psycopg']} · tortoise-orm {v['tortoise-orm']} · piccolo {v['piccolo']} · "
        f"uvloop {v['uvloop']} · {m['cpus']} CPUs · {mode}: {plan['repeats']} interleaved "
        f"rounds of ~{plan['target']} s per cell, loops {', '.join(run.loops)}, "
        f"{m.get('seconds', '?')} s in all"
    )


def load_lines(run: BenchRun) -> list[str]:
    out = []
    for loop, info in run.meta.get("per_loop", {}).items():
        load = info["load"]
        busy = load["cpus_busy"]
        own = load["this_process"]
        out.append(
            f"- {loop}: {info['seconds']} s; load average {load['load_average_start']} → "
            f"{load['load_average_end']}; all CPUs busy "
            f"{DASH if busy is None else f'{busy:.0%}'}, this process "
            f"{DASH if own is None else f'{own:.0%}'} of them (the server's backends and "
            "anything else running: the rest)"
        )
    return out


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _shown(e: Estimate | None) -> str:
    return DASH if e is None else e.shown()


def markdown(run: BenchRun, analysis: Analysis, *, title: str = "Benchmark") -> str:
    m = run.meta
    impls: dict[str, str] = m["implementations"]
    ops: dict[str, dict[str, str]] = m["operations"]
    out = [f"# {title}", "", headline(run), "", "Machine load during the run:", ""]
    out += load_lines(run)
    out += [
        "",
        f"Operations per second: the median of the timed rounds, and in brackets its 95 % "
        f"interval. Ratios are of medians, with a 95 % paired-bootstrap interval: "
        f"`core/asyncpg 0.500{TIMES}` = half of raw asyncpg's rate.",
    ]
    out += ["", "## Goals", ""]
    out += goal_lines(run, analysis)
    out += ["", "## Geometric means over the operations", ""]
    columns = [(loop, level) for loop in run.loops for level in run.concurrency]
    out.append(_row(["ratio", *(f"{loop}, concurrency {level}" for loop, level in columns)]))
    out.append("|---|" + "---|" * len(columns))
    names = list(analysis.geomeans[run.loops[0]][run.concurrency[0]])
    for name in names:
        out.append(
            _row(
                [RATIOS[name].title]
                + [_shown(analysis.geomeans[loop][level][name]) for loop, level in columns]
            )
        )
    if analysis.loop_ratios:
        second, first = run.loops[1], run.loops[0]
        out += ["", f"## {second} against {first}", ""]
        out.append(
            f"Geometric mean over the operations of each implementation's rate on {second} "
            f"divided by its rate on {first} (separate runs, so the interval is wider)."
        )
        out += ["", _row(["implementation", *(f"concurrency {lv}" for lv in run.concurrency)])]
        out.append("|---|" + "---|" * len(run.concurrency))
        for impl, levels in analysis.loop_ratios.items():
            out.append(_row([impls[impl], *(_shown(levels[lv]) for lv in run.concurrency)]))
    for loop in run.loops:
        for level in run.concurrency:
            out += ["", f"## {loop}, concurrency {level}: operations per second", ""]
            out.append(_row(["operation", *impls.values()]))
            out.append("|---|" + "---|" * len(impls))
            for op, info in ops.items():
                cells = []
                for key in impls:
                    s = summary_of(run, op, key, level, loop)
                    cells.append(s.shown() if s else "**failed**")
                out.append(_row([info["title"], *cells]))
            shown = [n for n in TABLE_RATIOS if n in analysis.geomeans[loop][level]]
            out += ["", f"Ratios, {loop}, concurrency {level}:", ""]
            out.append(_row(["operation", *(RATIOS[n].title for n in shown)]))
            out.append("|---|" + "---|" * len(shown))
            for op, info in ops.items():
                r = analysis.ratios[loop][level][op]
                out.append(_row([info["title"], *(_shown(r[n]) for n in shown)]))
            g = analysis.geomeans[loop][level]
            out.append(_row(["**geometric mean**", *(f"**{_shown(g[n])}**" for n in shown)]))
    out += ["", "## What each cell runs", ""]
    patterns: dict[str, dict[str, str]] = m["patterns"]
    for op, info in ops.items():
        out.append(f"- **{info['title']}** — {info['one_op']}:")
        for key, label in impls.items():
            out.append(f"  - {label}: {patterns.get(key, {}).get(op, DASH)}")
    if run.failed:
        out += ["", "## Failed cells", ""]
        for c in run.failed:
            out.append(
                f"- {ops[c.operation]['title']} · {impls[c.implementation]} · "
                f"concurrency {c.concurrency} · {c.loop}: {c.error}"
            )
    out.append("")
    return "\n".join(out)


def goal_lines(run: BenchRun, analysis: Analysis) -> list[str]:
    lines = []
    ops = run.meta["operations"]
    for g in goals(run, analysis):
        r = RATIOS[g["ratio"]]
        where = "geometric mean" if g["on"] == "geomean" else "every operation"
        mean = Estimate(**g["geomean"])
        target = g["target"]
        verdict = "**met**" if g["met"] else "**missed**"
        if g["on"] == "geomean" and mean.low <= target <= mean.high:
            verdict += " (its interval holds the target: not settled by this run)"
        line = (
            f"- {r.title} ≥ {target}{TIMES} on {where}, {g['loop']}, concurrency "
            f"{g['concurrency']}: {verdict}; geometric mean {mean.shown()}"
        )
        if g["missed_on"]:
            below = []
            for op, found in g["missed_on"].items():
                e = Estimate(**found)
                short = f"short by {1 - e.value / target:.0%}"
                if e.high >= target:
                    short += ", within the interval"
                below.append(f"{ops[op]['title']} {e.shown()}, {short}")
            line += f"; below {target}{TIMES} on: " + "; ".join(below)
        lines.append(line)
    return lines or ["- (the implementations the goals compare were not in this run)"]


def write(run: BenchRun, directory: Path, analysis: Analysis | None = None) -> list[Path]:
    """``bench.json`` and ``bench.md`` in ``directory`` (created); their paths."""
    analysis = analysis or analyse(run)
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / "bench.json"
    md_path = directory / "bench.md"
    json_path.write_text(json.dumps(to_json(run, analysis), indent=2) + "\n", encoding="utf-8")
    md_path.write_text(markdown(run, analysis), encoding="utf-8")
    return [json_path, md_path]
