"""The findings of one run as text: the question, then each scenario's checks and figures.

Standard library only.
"""

from __future__ import annotations

import textwrap

from .checks import Check
from .registry import format_sizes
from .results import Result, ScenarioResult

WIDTH = 100


def format_report(result: Result, database: str, *, with_traceback: bool = False) -> str:
    """The report ``testN`` prints; ``database`` names the server and the versions."""
    out: list[str] = []
    head = f"══ {result.experiment} · {result.title} "
    out.append(head + "═" * max(0, WIDTH - len(head)))
    out.append(_labelled("Question", result.question))
    out.append(_labelled("Database", database))
    if result.sizes:
        out.append(_labelled("Sizes", format_sizes(result.sizes)))
    number = 0
    for i, part in enumerate(result.scenarios, 1):
        out.append("")
        out.extend(_scenario(i, part, number, with_traceback=with_traceback))
        number += len(part.checks)
    if result.error is not None:
        out.append("")
        out.append(f"Cleanup failed: {result.error}")
        if with_traceback and result.traceback:
            out.append(result.traceback.rstrip())
    out.append("")
    out.append(f"{result.verdict()} ({result.seconds:.2f} s)")
    out.append("")
    return "\n".join(out)


def _scenario(index: int, part: ScenarioResult, before: int, *, with_traceback: bool) -> list[str]:
    head = f"── {index}. {part.title} "
    status = f" {part.status} ({part.seconds:.2f} s) ──"
    out = [head + "─" * max(1, WIDTH - len(head) - len(status)) + status]
    out.append(_wrap(part.doc, WIDTH))
    if part.skipped is not None:
        out.append(f"SKIPPED: {part.skipped}")
        if not part.checks:
            return out
    if part.checks:
        out.append("")
        rows: list[list[str]] = []
        for n, c in enumerate(part.checks, 1):
            verdict = c.verdict
            if c.skipped is not None:
                rows.append([str(before + n), c.name, "—", "—", verdict])
                continue
            if not c.parts:
                rows.append([str(before + n), c.name, c.expected, c.observed, verdict])
                continue
            rows.append([str(before + n), c.name, "", "", verdict])
            for key, want, got, ok in c.parts:
                rows.append(["", f"  · {key}", want, got, "" if ok else "✗"])
        out.extend(_table(["#", "check", "expected", "observed", "verdict"], rows))
        out.append("")
        for n, c in enumerate(part.checks, 1):
            out.append(_hanging(f"{before + n}. ", c.claim + _flags(c)))
            if c.skipped is not None:
                out.append(_hanging("   SKIPPED here: ", c.skipped))
            elif c.per_cell:
                cases = "; ".join(f"{k}: {v}" for k, v in c.per_cell.items())
                out.append(_hanging("   expected per cell: ", cases))
            if not c.parts:
                for difference in c.differences:
                    out.append(_hanging("   ✗ ", difference))
    if part.figures:
        out.append("")
        out.append("Measured:")
        width = max(len(f.label) for f in part.figures)
        for f in part.figures:
            out.append(f"  {f.label:<{width}}  {f.shown()}")
    if part.notes:
        out.append("")
        out.append("Notes:")
        for note in part.notes:
            out.append(_hanging("- ", note))
    if part.error is not None:
        out.append("")
        out.append(f"ERROR: {part.error}")
        if with_traceback and part.traceback:
            out.append(part.traceback.rstrip())
    elif not part.checks:
        out.append("")
        out.append("NO CHECK: the scenario ran to its end without checking anything")
    return out


def _flags(check: Check) -> str:
    return " (verdict by the rule shown as expected)" if check.rule else ""


def _labelled(label: str, text: str) -> str:
    pad = 10
    body = _wrap(text, WIDTH - pad)
    return textwrap.indent(body, " " * pad).replace(" " * pad, f"{label + ':':<{pad}}", 1)


def _hanging(marker: str, text: str) -> str:
    """``  1. text`` with continuation lines aligned under the text."""
    lead = "  " + marker
    return textwrap.fill(
        " ".join(text.split()), WIDTH, initial_indent=lead, subsequent_indent=" " * len(lead)
    )


def _wrap(text: str, width: int) -> str:
    paragraphs = [" ".join(p.split()) for p in text.split("\n\n")]
    return "\n".join(textwrap.fill(p, width) for p in paragraphs if p)


def _cell(text: str, width: int) -> list[str]:
    """A table cell's lines; a cell that starts indented keeps its indent on every line."""
    indent = " " * (len(text) - len(text.lstrip(" ·")))
    return textwrap.wrap(text, width, subsequent_indent=indent, drop_whitespace=True) or [""]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A plain-text table; long cells wrap inside their column."""
    limits = [3, 32, 24, 30, 7]
    widths = [min(limits[i], max(len(r[i]) for r in [header, *rows])) for i in range(len(header))]
    lines = []
    for n, row in enumerate([header, *rows]):
        cells = [_cell(cell, widths[i]) for i, cell in enumerate(row)]
        for k in range(max(len(c) for c in cells)):
            parts = [(c[k] if k < len(c) else "").ljust(widths[i]) for i, c in enumerate(cells)]
            lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("─" * w for w in widths))
    return lines
