"""The trial queue against a private redis-server and real ARQ workers: a job reaches its worker as
the same TrialJob, a pickled payload is never unpickled, and abort stops queued and running jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from arq.connections import ArqRedis
from arq.jobs import Job

from servetune.cluster import keys
from servetune.cluster.models import TrialJob
from servetune.cluster.queue import (
    FUNCTION_TIMEOUT_S,
    JOB_FUNCTION,
    JSON_DESERIALIZER,
    RemoteJobError,
    abort_trial,
    arq_pool,
    close_worker,
    enqueue_trial,
    forget_job,
    job_state,
    worker_settings,
)
from servetune.core.spec import parse_spec
from tests.redis_server import RedisServer

pytestmark = pytest.mark.integration

SPEC = parse_spec(
    {
        "name": "queue",
        "engine": {"kind": "llamacpp", "model": "model.gguf"},
        "space": {"params": {"threads": {"kind": "int", "low": 1, "high": 4}}},
        "workload": {"concurrency": [2], "num_requests": 4},
        "objective": {"metric": "output_tokens_per_s", "direction": "maximize"},
    }
)


def _job(trial_id: int = 7, worker_id: str = "w1") -> TrialJob:
    return TrialJob(
        job_id=f"trial-{trial_id}-1",
        study_id=3,
        study_name="queue",
        trial_id=trial_id,
        number=trial_id,
        params={"threads": 2, "flash-attn": True},
        spec=SPEC,
        timeout_s=60.0,
        worker_id=worker_id,
    )


class Calls:
    """What the test's job function saw: payloads received, starts, cancellations."""

    def __init__(self) -> None:
        self.payloads: list[dict[str, Any]] = []
        self.cancelled: list[str] = []
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    def function(self, block: bool = False) -> Callable[..., Awaitable[dict[str, Any]]]:
        calls = self

        async def run_trial_job(ctx: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
            calls.payloads.append(payload)
            calls.started.set()
            try:
                if block:
                    await calls.release.wait()
            except asyncio.CancelledError:
                calls.cancelled.append(ctx["job_id"])
                raise
            return {"trial_id": payload["trial_id"], "ok": True}

        return run_trial_job


@contextlib.asynccontextmanager
async def running_worker(
    url: str, worker_id: str, function: Callable[..., Any], max_jobs: int = 1
) -> AsyncIterator[None]:
    """An ARQ worker built by ``worker_settings`` running in this loop until the block ends."""
    pool = await arq_pool(url)
    worker = worker_settings(pool, worker_id, [function], max_jobs)
    task = asyncio.create_task(worker.async_run())
    try:
        yield
    finally:
        await close_worker(worker)
        await asyncio.gather(task, return_exceptions=True)


async def _wait_for(predicate: Callable[[], Awaitable[bool]], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def test_a_trial_job_reaches_its_own_workers_function_as_the_same_trial_job(
    private_redis: RedisServer,
) -> None:
    calls = Calls()

    async def scenario() -> list[str]:
        pool = await arq_pool(private_redis.url)
        try:
            states = []
            assert await enqueue_trial(pool, _job(7, "w1"))
            assert not await enqueue_trial(pool, _job(7, "w1"))  # same job id: enqueued once
            assert await enqueue_trial(pool, _job(8, "w2"))  # another worker's queue
            states.append(await job_state(pool, "trial-7-1", "w1"))
            async with running_worker(private_redis.url, "w1", calls.function()):

                async def done() -> bool:
                    return await job_state(pool, "trial-7-1", "w1") == "complete"

                await _wait_for(done)
                await asyncio.sleep(0.3)  # w2's job must stay put
            states.append(await job_state(pool, "trial-7-1", "w1"))
            states.append(await job_state(pool, "trial-8-1", "w2"))
            states.append(await job_state(pool, "nope", "w1"))
            result = await Job("trial-7-1", pool, _deserializer=JSON_DESERIALIZER).result(1)
            assert result == {"trial_id": 7, "ok": True}
            return states
        finally:
            await pool.aclose()

    states = asyncio.run(scenario())
    assert states == ["queued", "complete", "queued", "not_found"]
    assert [TrialJob.model_validate(p) for p in calls.payloads] == [_job(7, "w1")]


def test_the_worker_never_uses_arqs_300_s_timeout_nor_retries(private_redis: RedisServer) -> None:
    async def scenario() -> None:
        pool = await arq_pool(private_redis.url)
        worker = worker_settings(pool, "w1", [Calls().function()], 3)
        assert worker.queue_name == keys.queue("w1")
        assert worker.job_timeout_s == FUNCTION_TIMEOUT_S >= 30 * 24 * 3600
        assert (worker.max_tries, worker.retry_jobs, worker.allow_abort_jobs) == (1, False, True)
        assert worker.max_jobs == 3 and not worker._handle_signals
        assert worker.job_deserializer is JSON_DESERIALIZER
        await pool.aclose()
        with pytest.raises(ValueError, match="max-parallel"):
            worker_settings(pool, "w1", [Calls().function()], 0)

    asyncio.run(scenario())


class _Touch:
    """An attacker's payload: unpickling it runs code (here it only creates a file)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


def test_a_pickled_job_put_in_redis_is_refused_unread_and_logged(
    private_redis: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    marker = tmp_path / "pwned"
    payload = {"t": 1, "f": JOB_FUNCTION, "a": [], "k": {"payload": _Touch(marker)}, "et": 1}
    calls = Calls()

    async def scenario() -> str:
        pool = await arq_pool(private_redis.url)
        try:
            await pool.set(keys.arq_job("evil-1"), pickle.dumps(payload))
            await pool.zadd(keys.queue("w1"), {"evil-1": 1})
            async with running_worker(private_redis.url, "w1", calls.function()):

                async def handled() -> bool:
                    return await job_state(pool, "evil-1", "w1") == "complete"

                await _wait_for(handled)
            return await job_state(pool, "evil-1", "w1")
        finally:
            await pool.aclose()

    with caplog.at_level(logging.ERROR, logger="arq.worker"):
        assert asyncio.run(scenario()) == "complete"
    assert not marker.exists()
    assert calls.payloads == []
    refused = [r for r in caplog.records if "evil-1" in r.getMessage()]
    assert refused and refused[0].levelno == logging.ERROR
    assert refused[0].exc_info is not None
    assert "pickle" in str(refused[0].exc_info[1].__cause__)


def test_abort_takes_a_queued_job_out_even_with_no_worker_running(
    private_redis: RedisServer,
) -> None:
    calls = Calls()

    async def scenario() -> tuple[bool, str]:
        pool = await arq_pool(private_redis.url)
        try:
            await enqueue_trial(pool, _job(7, "w1"))
            t0 = time.monotonic()
            aborted = await abort_trial(pool, _job(7, "w1"), "w1", timeout_s=5)
            assert time.monotonic() - t0 < 1.0
            async with running_worker(private_redis.url, "w1", calls.function()):
                await asyncio.sleep(0.5)
            return aborted, await job_state(pool, "trial-7-1", "w1")
        finally:
            await pool.aclose()

    assert asyncio.run(scenario()) == (True, "not_found")
    assert calls.payloads == []


def test_abort_cancels_a_running_job_within_a_second(private_redis: RedisServer) -> None:
    calls = Calls()

    async def scenario() -> tuple[bool, float, Any]:
        pool = await arq_pool(private_redis.url)
        try:
            await enqueue_trial(pool, _job(7, "w1"))
            async with running_worker(private_redis.url, "w1", calls.function(block=True)):
                await asyncio.wait_for(calls.started.wait(), 5)
                assert await job_state(pool, "trial-7-1", "w1") == "in_progress"
                t0 = time.monotonic()
                aborted = await abort_trial(pool, "trial-7-1", "w1", timeout_s=5)
                took_s = time.monotonic() - t0
            info = await Job("trial-7-1", pool, _deserializer=JSON_DESERIALIZER).result_info()
            return aborted, took_s, info
        finally:
            await pool.aclose()

    aborted, took_s, info = asyncio.run(scenario())
    assert aborted and took_s < 1.0
    assert calls.cancelled == ["trial-7-1"]
    assert info is not None and not info.success
    assert isinstance(info.result, RemoteJobError) and info.result.type_name == "CancelledError"


def test_abort_says_false_when_the_running_jobs_worker_is_gone_and_forget_job_cleans_up(
    private_redis: RedisServer,
) -> None:
    async def scenario() -> tuple[bool, float, str]:
        pool: ArqRedis = await arq_pool(private_redis.url)
        try:
            await enqueue_trial(pool, _job(7, "w1"))
            await pool.set(keys.arq_in_progress("trial-7-1"), b"1")  # a worker took it, then died
            t0 = time.monotonic()
            aborted = await abort_trial(pool, "trial-7-1", "w1", timeout_s=0.5)
            took_s = time.monotonic() - t0
            await forget_job(pool, "trial-7-1", "w1")
            return aborted, took_s, await job_state(pool, "trial-7-1", "w1")
        finally:
            await pool.aclose()

    aborted, took_s, state = asyncio.run(scenario())
    assert not aborted and 0.4 < took_s < 2.0
    assert state == "not_found"


def test_a_worker_keeps_taking_jobs_after_redis_restarts(private_redis: RedisServer) -> None:
    calls = Calls()

    async def scenario() -> str:
        pool = await arq_pool(private_redis.url)
        try:
            async with running_worker(private_redis.url, "w1", calls.function()):
                await asyncio.sleep(0.3)  # the worker is polling
                private_redis.kill()
                await asyncio.sleep(0.5)  # its polls fail and are retried meanwhile
                await asyncio.to_thread(private_redis.start)
                await enqueue_trial(pool, _job(9, "w1"))

                async def done() -> bool:
                    return await job_state(pool, "trial-9-1", "w1") == "complete"

                await _wait_for(done)
            return await job_state(pool, "trial-9-1", "w1")
        finally:
            await pool.aclose()

    assert asyncio.run(scenario()) == "complete"
    assert [p["trial_id"] for p in calls.payloads] == [9]
