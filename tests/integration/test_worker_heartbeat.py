"""The worker's heartbeat thread against a private redis-server, with short heartbeats: a worker
whose event loop is blocked stays online, a Redis outage is logged once and survived, a stopped
heartbeat stops for good."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path

import pytest
import redis

from servetune.cluster import keys
from servetune.cluster.models import Heartbeat, RunningTrial, WorkerInfo, utc_now
from servetune.cluster.redis import connect
from servetune.cluster.registry import Registry
from servetune.settings import Settings
from servetune.worker.heartbeat import HeartbeatThread, TrialsSnapshot
from tests.redis_server import RedisServer

pytestmark = pytest.mark.integration

HEARTBEAT_S = 0.3


def _info(worker_id: str = "w-hb") -> WorkerInfo:
    return WorkerInfo(
        id=worker_id,
        hostname="host-hb",
        alias=None,
        address="127.0.0.1",
        pid=1,
        version="0.1.0",
        engines=["llamacpp"],
        deployments=["local"],
        gpus=[],
        cpu_count=2,
        memory_total_gib=4.0,
        max_parallel=1,
        started_at=utc_now(),
    )


def _trial(n: int) -> RunningTrial:
    return RunningTrial(
        job_id=f"trial-{n}-1", study_id=1, trial_id=n, number=n, started_at=utc_now()
    )


class _Watcher:
    """Polls the worker's heartbeat key from its own thread and client every 20 ms: what a
    manager would see, whatever the worker's event loop is doing."""

    def __init__(self, url: str, worker_id: str) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=2)
        self.key = keys.heartbeat(worker_id)
        self.absent = 0
        self.seen: list[Heartbeat] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            raw = self.client.get(self.key)
            if raw is None:
                self.absent += 1
            else:
                self.seen.append(Heartbeat.model_validate_json(raw))

    def __enter__(self) -> _Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.client.close()


def _until_beating(server: RedisServer, worker_id: str, timeout_s: float = 5.0) -> float:
    """Seconds until the worker's heartbeat key exists (polled every 20 ms)."""
    t0 = time.monotonic()
    with server.client() as c:
        while c.get(keys.heartbeat(worker_id)) is None and time.monotonic() - t0 < timeout_s:
            time.sleep(0.02)
    return time.monotonic() - t0


def test_a_worker_whose_event_loop_is_blocked_keeps_beating_and_stays_busy(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path, heartbeat_s=HEARTBEAT_S)
    blocked_s = 4 * HEARTBEAT_S  # longer than the heartbeat's TTL (3 periods)

    async def main() -> tuple[int, int, _Watcher]:
        r = connect(private_redis.url)
        registry = Registry(r, settings)
        snapshot = TrialsSnapshot()
        heart = HeartbeatThread(registry, private_redis.url, "w-hb", snapshot, settings)
        try:
            await registry.register(_info())
            await asyncio.to_thread(heart.beat_once)
            heart.start()
            snapshot.publish([_trial(5)], draining=False)  # what the loop does as a trial starts
            with _Watcher(private_redis.url, "w-hb") as watcher:
                await asyncio.sleep(HEARTBEAT_S)  # one beat carries the trial
                before = heart.beats
                time.sleep(blocked_s)  # noqa: ASYNC251 - a trial hogging the loop, on purpose
                during = heart.beats - before
                status = await registry.worker("w-hb")
            assert status is not None and status.state == "busy"
            return before, during, watcher
        finally:
            heart.stop(2)
            await r.aclose()

    before, during, watcher = asyncio.run(main())
    assert before >= 2
    assert during >= 3, f"only {during} beats in {blocked_s} s of a blocked loop"
    assert watcher.absent == 0, "the worker looked offline while its loop was blocked"
    assert watcher.seen and all([t.trial_id for t in hb.running] == [5] for hb in watcher.seen[-5:])


def test_a_redis_outage_is_logged_once_and_beats_resume_with_the_info_restored(
    private_redis: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(data_dir=tmp_path, heartbeat_s=HEARTBEAT_S)

    async def main() -> None:
        r = connect(private_redis.url)
        registry = Registry(r, settings)
        heart = HeartbeatThread(registry, private_redis.url, "w-hb", TrialsSnapshot(), settings)
        try:
            await registry.register(_info())
            heart.start()
            await asyncio.sleep(HEARTBEAT_S)
            private_redis.kill()
            await asyncio.sleep(5 * HEARTBEAT_S)  # several beats fail
            await asyncio.to_thread(private_redis.start)  # same port, no data
            back_s = await asyncio.to_thread(_until_beating, private_redis, "w-hb")
            with private_redis.client() as c:
                assert c.get(keys.worker_info("w-hb")) is not None  # registered again
            assert back_s < 3 * HEARTBEAT_S, f"beats came back after {back_s:.2f} s"
            status = await registry.worker("w-hb")
            assert status is not None and status.state == "online"
        finally:
            assert heart.stop(2)
            await r.aclose()

    with caplog.at_level(logging.DEBUG):
        asyncio.run(main())
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    outage = [r.getMessage() for r in warnings if "cannot reach Redis" in r.getMessage()]
    assert len(outage) == 1, [r.getMessage() for r in warnings]
    # the client's own "unreachable" lines stay at DEBUG: the thread reports the outage itself
    assert not any(r.name == "servetune.cluster.redis" for r in warnings)
    assert sum("reach Redis again" in r.getMessage() for r in caplog.records) == 1


def test_a_stopped_heartbeat_stops_within_its_bound_and_never_beats_again(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path, heartbeat_s=HEARTBEAT_S)

    async def main() -> tuple[float, bool]:
        r = connect(private_redis.url)
        registry = Registry(r, settings)
        heart = HeartbeatThread(registry, private_redis.url, "w-hb", TrialsSnapshot(), settings)
        try:
            await registry.register(_info())
            heart.start()
            await asyncio.sleep(1.5 * HEARTBEAT_S)
            t0 = time.monotonic()
            ended = await asyncio.to_thread(heart.stop, 2.0)
            stop_s = time.monotonic() - t0
            assert ended
            await registry.mark_offline("w-hb")
            await asyncio.sleep(2 * HEARTBEAT_S)
            status = await registry.worker("w-hb")
            return stop_s, status is not None and status.state == "offline"
        finally:
            await r.aclose()

    stop_s, offline = asyncio.run(main())
    assert stop_s < 1.0
    assert offline
