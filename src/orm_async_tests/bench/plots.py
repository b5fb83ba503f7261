"""Bar charts of a run, one PNG per operation group (writes, reads).

Each chart has a panel per concurrency level; in a panel, every operation gets a
bar per implementation showing its median operations per second *relative to
raw asyncpg* (asyncpg = 1), with the median's 95 % interval as an error bar and
the absolute median written on the bar; one chart per group and event loop.
Relative heights make operations whose rates differ by orders of magnitude (a
10,000-row insert, a primary-key read) readable on one axis. The charts are drawn
with matplotlib's object API on its Agg renderer (``Figure`` +
``FigureCanvasAgg``): no pyplot, no GUI backend, no global state.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .operations import GROUPS
from .report import ASYNCPG, summary_of
from .stats import number
from .suite import BenchRun

COLOURS = {
    "asyncpg": "#7f7f7f",
    "psycopg": "#b0b0b0",
    "sqlalchemy_naive": "#f4a261",
    "sqlalchemy_best": "#d62828",
    "sqlalchemy_orm": "#7b2cbf",
    "sqlalchemy_naive_psycopg": "#f9c89b",
    "sqlalchemy_best_psycopg": "#f08080",
    "sqlalchemy_orm_psycopg": "#c49bde",
    "tortoise": "#2a9d8f",
    "piccolo": "#1d3557",
}


def chart(run: BenchRun, group: str, path: Path, loop: str = "asyncio") -> Path:
    ops = {k: v for k, v in run.meta["operations"].items() if v["group"] == group}
    impls: dict[str, str] = run.meta["implementations"]
    levels = run.concurrency
    fig = Figure(figsize=(14, 4 * len(levels)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(levels), 1, squeeze=False)
    width = 0.8 / len(impls)
    for row, level in enumerate(levels):
        ax = axes[row][0]
        for i, (key, label) in enumerate(impls.items()):
            xs, heights, low, high, texts = [], [], [], [], []
            for x, op in enumerate(ops):
                base = summary_of(run, op, ASYNCPG, level, loop)
                s = summary_of(run, op, key, level, loop)
                if base is None or s is None:
                    continue
                xs.append(x + (i - (len(impls) - 1) / 2) * width)
                heights.append(s.median / base.median)
                low.append((s.median - s.low) / base.median)
                high.append((s.high - s.median) / base.median)
                texts.append(number(s.median))
            bars = ax.bar(
                xs,
                heights,
                width,
                yerr=[low, high],
                capsize=2,
                label=label,
                color=COLOURS.get(key),
                error_kw={"elinewidth": 0.8},
            )
            ax.bar_label(bars, labels=texts, fontsize=6.5, rotation=90, padding=3)
        ax.set_xticks(range(len(ops)), [v["title"] for v in ops.values()])
        ax.set_ylabel("ops/s relative to asyncpg")
        ax.axhline(1.0, color="#444444", linewidth=0.6, linestyle="--")
        ax.set_ylim(0, ax.get_ylim()[1] * 1.25)
        ax.set_title(
            f"{GROUPS[group]} · concurrency {level} · {loop} (bar labels: median ops/s; "
            "error bars: its 95 % interval)"
        )
        ax.grid(axis="y", linewidth=0.3)
        ax.set_axisbelow(True)
        if row == 0:
            ax.legend(ncols=(len(impls) + 1) // 2, fontsize=7, loc="upper right")
    m = run.meta
    fig.suptitle(
        f"{m['date'][:10]} · PostgreSQL {m['postgresql']} · SQLAlchemy "
        f"{m['versions']['sqlalchemy']} · asyncpg {m['versions']['asyncpg']} · "
        f"psycopg {m['versions']['psycopg']} · tortoise-orm {m['versions']['tortoise-orm']} · "
        f"piccolo {m['versions']['piccolo']} · {m['cpus']} CPUs",
        fontsize=9,
    )
    fig.savefig(path, dpi=110)
    return path


def write(run: BenchRun, directory: Path) -> list[Path]:
    """``bench-<group>.png`` (asyncio's loop) and ``bench-<group>-<loop>.png`` for each
    operation group that ran; their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    ran = {info["group"] for info in run.meta["operations"].values()}
    return [
        chart(
            run,
            group,
            directory / f"bench-{group}{'' if loop == 'asyncio' else '-' + loop}.png",
            loop,
        )
        for loop in run.loops
        for group in GROUPS
        if group in ran
    ]
