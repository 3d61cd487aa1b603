"""The worker registry against a private redis-server, with 0.2 s heartbeats: online, busy and
offline as users see them, a capped GPU history, an alias that outlives re-registration, and a
worker back online one heartbeat after Redis restarted without its data.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import pytest
import redis.asyncio

from servetune.cluster.models import GPUInfo, Heartbeat, RunningTrial, WorkerInfo, utc_now
from servetune.cluster.redis import connect
from servetune.cluster.registry import Registry
from servetune.errors import WorkerAliasTaken, WorkerNotFound
from servetune.settings import Settings
from tests.redis_server import RedisServer

pytestmark = pytest.mark.integration

T = TypeVar("T")
HEARTBEAT_S = 0.2


def _info(worker_id: str = "w1", alias: str | None = "own-name", gpus: int = 1) -> WorkerInfo:
    return WorkerInfo(
        id=worker_id,
        hostname=f"host-{worker_id}",
        alias=alias,
        address="10.0.0.7",
        pid=4242,
        version="0.1.0",
        engines=["llamacpp"],
        deployments=["local"],
        gpus=[_gpu(i, 0.0) for i in range(gpus)],
        cpu_count=8,
        memory_total_gib=31.3,
        max_parallel=2,
        started_at=utc_now(),
    )


def _gpu(index: int, used_gib: float) -> GPUInfo:
    return GPUInfo(
        index=index,
        name="NVIDIA H100 80GB HBM3",
        uuid=f"GPU-{index:08d}-0000-0000-0000-000000000000",
        memory_total_gib=79.6,
        memory_used_gib=used_gib,
        memory_free_gib=79.6 - used_gib,
        utilization_pct=50.0,
        temperature_c=40.0,
        power_w=300.0,
    )


def _beat(worker_id: str = "w1", running: int = 0, used_gib: float = 1.0) -> Heartbeat:
    trials = [
        RunningTrial(job_id=f"trial-{n}-1", study_id=1, trial_id=n, number=n, started_at=utc_now())
        for n in range(running)
    ]
    return Heartbeat(
        worker_id=worker_id, sent_at=utc_now(), running=trials, gpus=[_gpu(0, used_gib)]
    )


async def _state(registry: Registry, worker_id: str = "w1") -> str:
    status = await registry.worker(worker_id)
    assert status is not None
    return status.state


def _run(
    url: str, tmp_path: Path, scenario: Callable[[Registry], Awaitable[T]], **settings: object
) -> T:
    async def main() -> T:
        r: redis.asyncio.Redis = connect(url)
        options = {"heartbeat_s": HEARTBEAT_S, **settings}
        try:
            return await scenario(Registry(r, Settings(data_dir=tmp_path, **options)))
        finally:
            await r.aclose()

    return asyncio.run(main())


def test_a_worker_is_online_busy_then_offline_after_three_missed_heartbeats(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    async def scenario(registry: Registry) -> None:
        await registry.register(_info())
        assert await _state(registry) == "offline"
        first = _beat()
        await registry.beat(first)
        status = await registry.worker("w1")
        assert status is not None and status.state == "online"
        assert status.last_heartbeat == first and status.info == _info().model_copy(
            update={"started_at": status.info.started_at}
        )
        await registry.beat(_beat(running=1))
        assert await _state(registry) == "busy"
        await asyncio.sleep(1.5 * HEARTBEAT_S)  # a missed beat is not enough
        assert await _state(registry) == "busy"
        await asyncio.sleep(2 * HEARTBEAT_S)  # 3.5 periods without a beat
        gone = await registry.worker("w1")
        assert gone is not None and gone.state == "offline" and gone.last_heartbeat is None
        assert gone.last_seen_at is not None
        assert timedelta(0) <= utc_now() - gone.last_seen_at < timedelta(seconds=2)
        assert [s.info.id for s in await registry.workers()] == ["w1"]  # offline ones listed
        assert await registry.worker("nobody") is None

    _run(private_redis.url, tmp_path, scenario)


def test_a_worker_stopping_cleanly_is_offline_at_once(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    async def scenario(registry: Registry) -> str:
        await registry.register(_info())
        await registry.beat(_beat())
        await registry.mark_offline("w1")
        return await _state(registry)

    assert _run(private_redis.url, tmp_path, scenario) == "offline"


def test_gpu_history_keeps_the_newest_samples_first_up_to_its_length(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    async def scenario(registry: Registry) -> tuple[list[float], list[float], list[float]]:
        await registry.register(_info())
        for used in (1.0, 2.0, 3.0, 4.0, 5.0):
            await registry.beat(_beat(used_gib=used))
        every = await registry.gpu_history("w1", limit=100)
        two = await registry.gpu_history("w1", limit=2)
        nothing = await registry.gpu_history("unknown", limit=5)
        assert all(a.at >= b.at for a, b in itertools.pairwise(every))
        return (
            [s.gpus[0].memory_used_gib for s in every],
            [s.gpus[0].memory_used_gib for s in two],
            [s.gpus[0].memory_used_gib for s in nothing],
        )

    got = _run(private_redis.url, tmp_path, scenario, gpu_history_len=3)
    assert got == ([5.0, 4.0, 3.0], [5.0, 4.0], [])


def test_an_alias_set_by_the_user_outlives_re_registration_and_can_be_cleared(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    async def scenario(registry: Registry) -> list[str | None]:
        await registry.register(_info(alias="own-name"))
        await registry.beat(_beat())
        with pytest.raises(ValueError, match="starts or ends with a space"):
            await registry.set_alias("w1", "  rack-2 left  ")  # refused, not silently changed
        renamed = await registry.set_alias("w1", "rack-2 left")
        names = [renamed.info.alias]
        await registry.register(_info(alias="own-name"))  # the worker restarted
        names.append((await registry.workers())[0].info.alias)
        cleared = await registry.set_alias("w1", None)
        names.append(cleared.info.alias)
        with pytest.raises(WorkerNotFound, match="nobody"):
            await registry.set_alias("nobody", "x")
        with pytest.raises(ValueError, match="alias"):
            await registry.set_alias("w1", "x" * 101)
        await registry.register(_info("w2", alias="other"))
        with pytest.raises(WorkerAliasTaken, match="taken by worker w2"):
            await registry.set_alias("w1", "OTHER")
        return names

    assert _run(private_redis.url, tmp_path, scenario) == ["rack-2 left", "rack-2 left", "own-name"]


def test_workers_are_listed_by_name_and_forget_removes_every_trace(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    async def scenario(registry: Registry) -> tuple[list[str], list[str], int]:
        await registry.register(_info("w1", alias="zeta"))
        await registry.register(_info("w2", alias="alpha"))
        await registry.register(_info("w3", alias=None))
        for worker_id in ("w1", "w2", "w3"):
            await registry.beat(_beat(worker_id))
        listed = [s.info.id for s in await registry.workers()]
        await registry.forget("w1")
        left = [s.info.id for s in await registry.workers()]
        keys = await registry.r.keys("servetune:worker:w1:*")
        return listed, left, len(keys)

    # by alias, else host name: alpha, host-w3, zeta
    assert _run(private_redis.url, tmp_path, scenario) == (["w2", "w3", "w1"], ["w2", "w3"], 0)


def test_after_redis_restarts_one_beat_brings_the_worker_back_online(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    async def scenario(registry: Registry) -> None:
        await registry.register(_info())
        assert await registry.beat(_beat()) is False  # nothing to restore
        private_redis.kill()
        await asyncio.to_thread(private_redis.start)
        assert await registry.workers() == []  # Redis lost everything
        assert await registry.beat(_beat(running=1)) is True
        status = await registry.worker("w1")
        assert status is not None and status.state == "busy"
        assert status.info.hostname == "host-w1"

    _run(private_redis.url, tmp_path, scenario)
