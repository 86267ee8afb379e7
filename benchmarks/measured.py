"""One child process, measured: wall time, CPU time and its own peak resident memory.

Shared by the benchmarks that run each engine in a fresh process (algorithms.py, rl_vs_trl.py).
``resource.getrusage(RUSAGE_CHILDREN)`` gives the largest peak of *all* children waited for so far,
so the child is reaped with ``os.wait4``, which returns that one child's own figures.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Measured:
    wall_seconds: float
    cpu_seconds: float  # user + system of the child (and of any process it waited for)
    peak_rss_mb: float  # the child's peak resident set (ru_maxrss, kilobytes on Linux)
    load_before: str
    load_after: str


def load_average() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def run_measured(command: Sequence[str], *, cwd: Path, env: dict[str, str] | None = None) -> Measured:
    """Run ``command`` to its end; raise CalledProcessError if it fails."""
    load_before = load_average()
    started = time.perf_counter()
    child = subprocess.Popen(list(command), cwd=cwd, env=env)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait for it again
    if child.returncode != 0:
        raise subprocess.CalledProcessError(child.returncode, list(command))
    return Measured(
        wall_seconds=wall,
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        peak_rss_mb=usage.ru_maxrss / 1024,
        load_before=load_before,
        load_after=load_average(),
    )
