"""What else the machine did during a run: load average and CPU time, recorded in the report.

A benchmark on a shared machine is only as good as the machine's quiet: the report
keeps, for each event loop's run, the 1-minute load average at its start and end,
how busy all CPUs were over the run (``/proc/stat``), and how much of that was this
process (the benchmark's client side; the server's backends are other processes).
Where ``/proc/stat`` does not exist (not Linux), the CPU figures are ``None``.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROC_STAT = Path("/proc/stat")


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot, or ``None`` without /proc/stat."""
    try:
        first = PROC_STAT.read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    values = [int(v) for v in first[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values) - idle, sum(values)


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class MachineLoad:
    started: float
    load_at_start: float
    jiffies: tuple[int, int] | None
    own_cpu: float

    @classmethod
    def start(cls) -> MachineLoad:
        return cls(time.perf_counter(), os.getloadavg()[0], _cpu_jiffies(), _own_cpu())

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def stop(self) -> dict[str, Any]:
        """``load average at start/end``, ``cpus busy`` (0 to 1: all CPUs), and the share
        of all CPUs this process used."""
        elapsed = self.seconds()
        now = _cpu_jiffies()
        busy: float | None = None
        if now is not None and self.jiffies is not None and now[1] > self.jiffies[1]:
            busy = (now[0] - self.jiffies[0]) / (now[1] - self.jiffies[1])
        cpus = os.cpu_count() or 1
        own = (_own_cpu() - self.own_cpu) / (elapsed * cpus) if elapsed > 0 else None
        return {
            "load_average_start": round(self.load_at_start, 2),
            "load_average_end": round(os.getloadavg()[0], 2),
            "cpus_busy": None if busy is None else round(busy, 3),
            "this_process": None if own is None else round(own, 3),
        }
