"""TrialSlots: the CPU threads and GPUs that trials in flight on one host share.

The study loop acquires a trial's ``Engine.needs`` before launching it and releases it after.
"""

from __future__ import annotations

import asyncio
import logging
import os

from servetune.core.spec import KubernetesDeploymentSpec, StudySpec
from servetune.core.study import TrialNeeds

log = logging.getLogger(__name__)

GPU_ENGINES = frozenset({"vllm", "sglang"})
"""Engine kinds whose trials occupy GPUs (``TrialNeeds.gpus`` > 0)."""


class TrialSlots:
    """Capacity of one host for trials in flight at once: ``cpu_threads`` and ``gpus`` in all
    (None = not counted, unlimited).

    ``acquire(needs)`` waits until the trial fits beside the ones holding slots, then takes
    them; ``release(needs)`` gives them back. A trial needing more than the total of a resource
    is given all of it, so it runs alone (as far as that resource goes) instead of never.
    Use it from one event loop (asyncio, not thread-safe). Raises ValueError for a total < 1
    CPU thread or < 0 GPUs.
    """

    def __init__(self, cpu_threads: int | None, gpus: int | None) -> None:
        if cpu_threads is not None and cpu_threads < 1:
            raise ValueError(f"cpu_threads = {cpu_threads}: use ≥ 1, or None for unlimited")
        if gpus is not None and gpus < 0:
            raise ValueError(f"gpus = {gpus}: use ≥ 0, or None for unlimited")
        self.cpu_threads = cpu_threads
        """CPU threads in all (None = unlimited)."""
        self.gpus = gpus
        """GPUs in all (None = unlimited)."""
        self.cpu_threads_used = 0
        """CPU threads held by trials now."""
        self.gpus_used = 0
        """GPUs held by trials now."""
        self._waiters: list[asyncio.Future[None]] = []

    @classmethod
    def unlimited(cls) -> TrialSlots:
        """Slots that never make a trial wait (a manager's RemoteRunner places trials itself)."""
        return cls(None, None)

    @classmethod
    def for_host(cls, spec: StudySpec) -> TrialSlots:
        """The default for ``servetune run``: this host's logical cores (``os.cpu_count()``).

        GPUs are not counted here (unlimited for a GPU engine, 0 otherwise): local GPU
        placement is out of scope, a GPU engine's own pre-flight checks its sizes against the
        host's GPUs, and ``budget.parallel`` bounds how many run at once. A Kubernetes
        deployment runs its trials on the cluster, not on this host: unlimited.
        """
        if isinstance(spec.deployment, KubernetesDeploymentSpec):
            return cls.unlimited()
        return cls(os.cpu_count() or 1, None if spec.engine.kind in GPU_ENGINES else 0)

    def _share(self, needs: TrialNeeds) -> tuple[int, int]:
        """(cpu threads, gpus) the trial takes: its needs, capped at each total."""
        cpu = (
            needs.cpu_threads
            if self.cpu_threads is None
            else min(needs.cpu_threads, self.cpu_threads)
        )
        gpus = needs.gpus if self.gpus is None else min(needs.gpus, self.gpus)
        return cpu, gpus

    def fits(self, needs: TrialNeeds) -> bool:
        """True when a trial with ``needs`` could start now without waiting."""
        cpu, gpus = self._share(needs)
        cpu_ok = self.cpu_threads is None or self.cpu_threads_used + cpu <= self.cpu_threads
        gpu_ok = self.gpus is None or self.gpus_used + gpus <= self.gpus
        return cpu_ok and gpu_ok

    async def acquire(self, needs: TrialNeeds) -> None:
        """Wait until ``needs`` fits, then hold it (give it back with ``release``)."""
        while not self.fits(needs):
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        cpu, gpus = self._share(needs)
        self.cpu_threads_used += cpu
        self.gpus_used += gpus

    def release(self, needs: TrialNeeds) -> None:
        """Give back what ``acquire(needs)`` took and wake the trials waiting for room."""
        cpu, gpus = self._share(needs)
        self.cpu_threads_used = max(0, self.cpu_threads_used - cpu)
        self.gpus_used = max(0, self.gpus_used - gpus)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def describe(self) -> str:
        """``"4 CPU threads, GPUs not counted"``-style summary for messages."""
        cpu = (
            "CPU threads not counted"
            if self.cpu_threads is None
            else f"{self.cpu_threads} CPU threads"
        )
        gpus = "GPUs not counted" if self.gpus is None else f"{self.gpus} GPUs"
        return f"{cpu}, {gpus}"
