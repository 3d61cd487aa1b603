"""Outside load: the CPU time other processes used on this host while a trial was measured.

psutil reads the system-wide and per-process CPU times; ``outside_cpu_fraction`` is the arithmetic.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU times at one moment: ``at_s`` monotonic s; ``busy_s`` every core's non-idle time, s;
    ``excluded_s`` the CPU time of the excluded processes (servetune and the engine), s;
    ``cores`` logical CPUs."""

    at_s: float
    busy_s: float
    excluded_s: float
    cores: int


def outside_cpu_fraction(start: CpuSnapshot, end: CpuSnapshot) -> float | None:
    """Share of all cores (0–1) that other processes used between two snapshots.

    (Δbusy − Δexcluded) / (Δwall × cores), clamped to [0, 1] (per-process times of processes that
    exited in between are lost, and times tick in 10 ms steps, so a raw value can leave the
    range). None when no time passed.
    """
    wall = end.at_s - start.at_s
    if wall <= 0 or end.cores <= 0:
        return None
    other = (end.busy_s - start.busy_s) - (end.excluded_s - start.excluded_s)
    return min(1.0, max(0.0, other / (wall * end.cores)))


def _busy_s() -> float:
    """Non-idle CPU time of all cores since boot, s (Linux /proc/stat through psutil).

    user + nice + system + irq + softirq + steal; ``guest``/``guest_nice`` are already inside
    user/nice on Linux (proc(5)), and iowait is idle time.
    """
    t = psutil.cpu_times()
    return sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal"))


def _process_s(p: psutil.Process) -> float:
    """CPU time of ``p`` and of its children it has already waited for, s (0 if it is gone)."""
    try:
        t = p.cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return 0.0
    return t.user + t.system + t.children_user + t.children_system


class OutsideLoadMeter:
    """Measures the CPU share of every process except this process tree and one engine's.

    ``snapshot(engine_pid, engine_pgid)`` excludes this process and all its descendants, the
    engine process and its descendants, and every process in the engine's process group (a
    detached helper it started). Use two snapshots around a benchmark and
    ``outside_cpu_fraction``. Costs one scan of the process table per snapshot (a few ms).
    """

    def __init__(self) -> None:
        self._self = psutil.Process()

    def snapshot(
        self, engine_pid: int | None = None, engine_pgid: int | None = None
    ) -> CpuSnapshot:
        """CPU times now; see the class docstring for what is excluded."""
        procs: dict[int, psutil.Process] = {self._self.pid: self._self}
        roots: list[psutil.Process] = [self._self]
        if engine_pid is not None:
            with contextlib.suppress(psutil.Error):
                roots.append(psutil.Process(engine_pid))
        for root in roots:
            procs[root.pid] = root
            with contextlib.suppress(psutil.Error):
                procs.update((c.pid, c) for c in root.children(recursive=True))
        if engine_pgid is not None:
            procs.update((p.pid, p) for p in _group_members(engine_pgid))
        excluded = sum(_process_s(p) for p in procs.values())
        return CpuSnapshot(
            at_s=time.monotonic(),
            busy_s=_busy_s(),
            excluded_s=excluded,
            cores=psutil.cpu_count() or 1,
        )


def _group_members(pgid: int) -> Iterable[psutil.Process]:
    for p in psutil.process_iter():
        with contextlib.suppress(OSError):
            if os.getpgid(p.pid) == pgid:
                yield p
