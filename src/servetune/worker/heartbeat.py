"""The worker's heartbeat in a thread of its own, so a trial that keeps the event loop busy never
makes a live worker look lost (three missed beats = offline, and its trial placed elsewhere).

The event loop publishes the running trials in a ``TrialsSnapshot``; ``HeartbeatThread`` reads
it, the GPUs and the host's memory and load, and beats through its own synchronous Redis client.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable

from redis.exceptions import RedisError

from servetune.cluster.models import GPUInfo, Heartbeat, RunningTrial, utc_now
from servetune.cluster.redis import connect_sync, safe_url
from servetune.cluster.registry import MISSED_BEATS, Registry
from servetune.errors import ServetuneError
from servetune.settings import Settings
from servetune.worker.gpu import host_facts, read_gpus

__all__ = ["HeartbeatThread", "TrialsSnapshot"]

log = logging.getLogger(__name__)


class TrialsSnapshot:
    """What the worker is doing, handed from the event loop to the heartbeat thread.

    The loop calls ``publish`` whenever a trial starts or ends or the worker starts draining;
    any thread calls ``read``. Both take a lock; the trials are immutable pydantic models.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: tuple[RunningTrial, ...] = ()
        self._draining = False

    def publish(self, running: Iterable[RunningTrial], draining: bool) -> None:
        """Replace the snapshot: the trials in progress now, and whether the worker is stopping."""
        trials = tuple(running)
        with self._lock:
            self._running = trials
            self._draining = draining

    def read(self) -> tuple[list[RunningTrial], bool]:
        """``(running trials, draining)`` as last published."""
        with self._lock:
            return list(self._running), self._draining


def _load_fraction() -> float | None:
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:  # pragma: no cover - no load average on this platform
        return None


class HeartbeatThread:
    """Beats for worker ``worker_id`` every ``settings.heartbeat_s`` from a daemon thread.

    Each beat: GPUs (``read_gpus``, NVML), host memory available (GiB) and 1-minute load per
    core, the trials and draining flag of ``snapshot``, written with ``Registry.beat_sync``
    through a synchronous client of its own on ``url`` (``connect_sync``: retries for about half
    a period, a reply waited for at most ``MISSED_BEATS`` periods, so a beat never outlasts the
    heartbeat's TTL by much). Nothing here waits for the event loop, so a loop blocked by a trial
    still beats. When Redis is unreachable the thread logs it once (WARNING), keeps trying every
    period, and logs once (INFO) when beats arrive again; ``Registry.beat_sync`` stores the
    worker's info again if Redis lost it. ``read_gpus_fn`` replaces NVML in tests.
    """

    def __init__(
        self,
        registry: Registry,
        url: str,
        worker_id: str,
        snapshot: TrialsSnapshot,
        settings: Settings,
        *,
        read_gpus_fn: Callable[[], list[GPUInfo]] = read_gpus,
    ) -> None:
        self.registry = registry
        self.worker_id = worker_id
        self.snapshot = snapshot
        self.period_s = settings.heartbeat_s
        self.read_gpus = read_gpus_fn
        self.where = safe_url(url)
        self.client = connect_sync(
            url,
            retry_for_s=max(0.1, self.period_s / 2),
            socket_timeout_s=max(1.0, MISSED_BEATS * self.period_s),
            log_outages=False,
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"servetune-heartbeat-{worker_id}", daemon=True
        )
        self.beats = 0
        """Beats written so far."""

    def heartbeat(self) -> Heartbeat:
        """The heartbeat to send now (reads NVML and psutil: call it from the thread)."""
        running, draining = self.snapshot.read()
        _, _, available_gib = host_facts()
        return Heartbeat(
            worker_id=self.worker_id,
            sent_at=utc_now(),
            running=running,
            gpus=self.read_gpus(),
            memory_available_gib=available_gib,
            cpu_load_fraction=_load_fraction(),
            draining=draining,
        )

    def beat_once(self) -> bool:
        """Build and write one heartbeat now (blocking); True when the worker's info had to be
        stored again. Raises RedisUnavailable when Redis cannot be used."""
        restored = self.registry.beat_sync(self.client, self.heartbeat())
        self.beats += 1
        return restored

    def start(self) -> None:
        """Start beating (the first beat goes at once)."""
        self._thread.start()

    def stop(self, timeout_s: float) -> bool:
        """Stop the thread, waiting at most ``timeout_s`` for a beat in progress; close the
        client. True when the thread ended in time (else it ends after that beat)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        ended = not self._thread.is_alive()
        if ended:
            self.client.close()
        else:
            log.warning("the heartbeat thread did not end within %.1f s", timeout_s)
        return ended

    def _run(self) -> None:
        outage_since: float | None = None
        missed = 0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.beat_once()
            except (ServetuneError, RedisError, OSError) as e:
                missed += 1
                if outage_since is None:
                    outage_since = started
                    log.warning(
                        "heartbeats of worker %s cannot reach Redis at %s (%s): trying again "
                        "every %g s",
                        self.worker_id,
                        self.where,
                        e,
                        self.period_s,
                    )
            except Exception:  # a bug must not silence the heartbeat: log it, beat again
                missed += 1
                log.exception("a heartbeat of worker %s failed", self.worker_id)
            else:
                if outage_since is not None:
                    log.info(
                        "heartbeats of worker %s reach Redis again after %.1f s (%d missed)",
                        self.worker_id,
                        time.monotonic() - outage_since,
                        missed,
                    )
                    outage_since, missed = None, 0
            self._stop.wait(max(0.0, started + self.period_s - time.monotonic()))
