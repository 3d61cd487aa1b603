"""The trial queue: ARQ on Redis with a JSON-only (de)serializer, one queue per worker, abortable
jobs whose timeout the job itself enforces (``TrialJob.timeout_s``), never ARQ's 300 s default.

ARQ's default serializer is pickle, so whoever can write to Redis could run code on a worker; here
a payload that is not a JSON object is refused unread (``PayloadRefused``) and ARQ logs the failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any, Literal, cast

import redis.asyncio
from arq import Worker
from arq.connections import ArqRedis
from arq.jobs import Job, JobStatus
from arq.worker import Function, func
from redis.exceptions import RedisError, WatchError

from servetune.cluster import keys
from servetune.cluster.models import TrialJob
from servetune.cluster.redis import connect, redis_errors, safe_url, translate
from servetune.cluster.tasks import cancel_and_wait
from servetune.errors import PayloadRefused

__all__ = [
    "CLOSE_WAIT_S",
    "FUNCTION_TIMEOUT_S",
    "JOB_FUNCTION",
    "JSON_DESERIALIZER",
    "JSON_SERIALIZER",
    "KEEP_RESULT_S",
    "POLL_DELAY_S",
    "JobState",
    "RemoteJobError",
    "abort_trial",
    "arq_pool",
    "close_worker",
    "enqueue_trial",
    "forget_job",
    "job_state",
    "worker_settings",
]

logger = logging.getLogger(__name__)

JOB_FUNCTION = "run_trial_job"
"""Name of the ARQ function a worker registers for trial jobs (``worker/jobs.py``)."""
FUNCTION_TIMEOUT_S = 30 * 24 * 3600.0
"""ARQ's own timeout of a job, s: 30 days, i.e. none; the job enforces ``TrialJob.timeout_s``."""
KEEP_RESULT_S = 3600.0
"""How long ARQ keeps a finished job's result in Redis, s (results travel on the events stream)."""
CLOSE_WAIT_S = 30.0
"""How long ``close_worker`` waits for the poll loop, then for the running jobs, to end, s."""
POLL_DELAY_S = 0.2
"""How often an ARQ worker polls its queue and the abort set, s (bounds the delay of an abort)."""

JobState = Literal["queued", "in_progress", "complete", "not_found"]
"""Where a job is: waiting in its queue, running on a worker, finished (result kept), or unknown."""

_ERROR_KEY = "__servetune_error__"


class RemoteJobError(Exception):
    """A job that failed on an ARQ worker, as read back from its JSON result.

    ``type_name`` is the exception's class name on the worker (``CancelledError`` for an aborted
    job), ``message`` its text. Exceptions are never rebuilt as their own class: that is what
    pickle does, and what this queue refuses.
    """

    def __init__(self, type_name: str, message: str) -> None:
        self.type_name = type_name
        self.message = message
        super().__init__(f"{type_name}: {message}" if message else type_name)


def _encode(value: Any) -> Any:
    if isinstance(value, RemoteJobError):
        return {_ERROR_KEY: {"type": value.type_name, "message": value.message}}
    if isinstance(value, BaseException):
        return {_ERROR_KEY: {"type": type(value).__name__, "message": str(value)}}
    raise TypeError(
        f"a {type(value).__name__} is not JSON: a queue payload holds only dicts, lists, strings, "
        "numbers, booleans and None (use model_dump(mode='json') for a pydantic model)"
    )


def JSON_SERIALIZER(data: dict[str, Any]) -> bytes:
    """ARQ's job and result serializer: ``data`` → compact UTF-8 JSON bytes.

    Exceptions (a failed job's result in ARQ's ``r`` field) become ``{"__servetune_error__":
    {"type", "message"}}``. Raises TypeError for anything else that is not plain JSON, and
    ValueError for NaN or infinity (not JSON either).
    """
    return json.dumps(data, default=_encode, allow_nan=False, separators=(",", ":")).encode()


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def JSON_DESERIALIZER(data: bytes) -> dict[str, Any]:
    """ARQ's job and result deserializer: UTF-8 JSON bytes holding one object → that dict.

    Raises PayloadRefused for anything else (a pickle, other bytes, JSON that is not an object,
    NaN/Infinity), without ever interpreting it. A failed job's encoded exception (see
    ``JSON_SERIALIZER``) in the result field ``r`` comes back as a ``RemoteJobError``.
    """
    head = bytes(data[:16])
    try:
        value = json.loads(bytes(data).decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, TypeError) as e:
        hint = " (a pickle: refused unread)" if head.startswith(b"\x80") else ""
        raise PayloadRefused(
            f"queue payload is not JSON{hint}: {e}; it starts with {head!r}. Only servetune's "
            "JSON serializer may write jobs (who else writes to this Redis?)"
        ) from e
    if not isinstance(value, dict):
        raise PayloadRefused(
            f"queue payload is JSON but a {type(value).__name__}, not an object; starts {head!r}"
        )
    result = value.get("r")
    if value.get("s") is False and isinstance(result, dict) and set(result) == {_ERROR_KEY}:
        error = result[_ERROR_KEY]
        if isinstance(error, dict):
            value["r"] = RemoteJobError(str(error.get("type", "")), str(error.get("message", "")))
    return value


async def arq_pool(url: str) -> ArqRedis:
    """An ARQ client on ``url`` with the JSON (de)serializers and ``connect``'s retrying client.

    It PINGs once (retrying for about 30 s). Raises RedisUnavailable (URL masked) when ``url`` is
    not a Redis URL or Redis cannot be reached or refuses the password.
    """
    pool = cast(ArqRedis, connect(url, client_class=ArqRedis))
    pool.job_serializer = JSON_SERIALIZER
    pool.job_deserializer = JSON_DESERIALIZER
    try:
        await pool.ping()
    except RedisError as e:
        await pool.aclose()
        raise translate(e, safe_url(url), "connecting the job queue") from e
    return pool


async def enqueue_trial(pool: ArqRedis, job: TrialJob) -> bool:
    """Put ``job`` on its worker's queue (``keys.queue(job.worker_id)``), ARQ job id ``job.job_id``.

    The ARQ function is ``JOB_FUNCTION`` with the one keyword argument ``payload`` =
    ``job.model_dump(mode="json")``. Returns True when enqueued, False when a job with that id
    is already queued, running or has a kept result (enqueuing twice is harmless). Raises
    RedisUnavailable.
    """
    with redis_errors(pool, f"enqueuing job {job.job_id}"):
        queued = await pool.enqueue_job(
            JOB_FUNCTION,
            _job_id=job.job_id,
            _queue_name=keys.queue(job.worker_id),
            payload=job.model_dump(mode="json"),
        )
    if queued is None:
        logger.info("job %s is already known to worker %s's queue", job.job_id, job.worker_id)
        return False
    logger.info(
        "enqueued trial %d of study %d (job %s) for worker %s",
        job.number,
        job.study_id,
        job.job_id,
        job.worker_id,
    )
    return True


async def job_state(pool: ArqRedis, job_id: str, worker_id: str) -> JobState:
    """Where job ``job_id`` on ``worker_id``'s queue is now (ARQ's status; deferred = queued).

    Note that a job whose worker was killed stays ``in_progress`` until ARQ's in-progress key
    expires (``FUNCTION_TIMEOUT_S``): tell a lost worker by the registry, not by this.
    Raises RedisUnavailable.
    """
    job = Job(job_id, pool, _queue_name=keys.queue(worker_id), _deserializer=JSON_DESERIALIZER)
    with redis_errors(pool, f"reading the state of job {job_id}"):
        status = await job.status()
    if status in (JobStatus.queued, JobStatus.deferred):
        return "queued"
    return cast(JobState, status.value)


async def _remove_if_not_started(pool: ArqRedis, job_id: str, queue: str) -> bool:
    """Take a job out of its queue unless a worker has started it; True when it was taken out."""
    in_progress = keys.arq_in_progress(job_id)
    async with pool.pipeline(transaction=True) as pipe:
        await pipe.watch(in_progress)
        if await pipe.exists(in_progress):
            return False
        pipe.multi()  # type: ignore[no-untyped-call]
        pipe.zrem(queue, job_id)
        pipe.delete(keys.arq_job(job_id))
        try:
            removed, _ = await pipe.execute()
        except WatchError:  # a worker started it meanwhile
            return False
    return bool(removed)


async def abort_trial(
    pool: ArqRedis, job: TrialJob | str, worker_id: str, timeout_s: float = 10
) -> bool:
    """Abort a trial job on ``worker_id``'s queue; True once it no longer runs.

    A job still waiting in the queue is taken out at once (no worker involved, so this works for
    a worker that is gone). A running one is cancelled through ARQ's abort set: its worker sees
    it within ``POLL_DELAY_S`` and cancels the job's task (``run_trial_job`` then stops the
    engine and reports the trial cancelled); this waits up to ``timeout_s`` for ARQ to record
    that the job ended. Returns False when it still runs after ``timeout_s`` (its worker is
    stuck or dead). A job that already finished, or is unknown, gives True. Raises
    RedisUnavailable.
    """
    job_id = job.job_id if isinstance(job, TrialJob) else job
    queue = keys.queue(worker_id)
    with redis_errors(pool, f"aborting job {job_id}"):
        if await _remove_if_not_started(pool, job_id, queue):
            logger.info(
                "job %s taken out of worker %s's queue before it started", job_id, worker_id
            )
            return True
        if await job_state(pool, job_id, worker_id) in ("complete", "not_found"):
            return True
        await pool.zadd(keys.ARQ_ABORT, {job_id: int(time.time() * 1000)})
        logger.info("asked worker %s to abort job %s", worker_id, job_id)
        deadline = time.monotonic() + timeout_s
        while True:
            if await job_state(pool, job_id, worker_id) in ("complete", "not_found"):
                return True
            if time.monotonic() >= deadline:
                logger.warning(
                    "job %s on worker %s still runs %.1f s after the abort",
                    job_id,
                    worker_id,
                    timeout_s,
                )
                return False
            await asyncio.sleep(min(0.1, timeout_s))


async def forget_job(pool: ArqRedis, job_id: str, worker_id: str) -> None:
    """Remove every trace of job ``job_id`` from ``worker_id``'s queue: for a job whose worker is
    gone (killed mid-trial), which ARQ would otherwise show ``in_progress`` for
    ``FUNCTION_TIMEOUT_S`` and keep in the queue, skipped by the worker when it comes back.

    Call it once the trial was placed elsewhere or failed ``worker_lost``. Raises
    RedisUnavailable.
    """
    with redis_errors(pool, f"forgetting job {job_id}"):
        async with pool.pipeline(transaction=True) as pipe:
            pipe.zrem(keys.queue(worker_id), job_id)
            pipe.zrem(keys.ARQ_ABORT, job_id)
            pipe.delete(keys.arq_job(job_id), keys.arq_in_progress(job_id))
            await pipe.execute()
    logger.info("forgot job %s of worker %s", job_id, worker_id)


async def forget_trial_jobs(
    r: redis.asyncio.Redis, trial_ids: Collection[int], worker_ids: Collection[str]
) -> list[str]:
    """Remove the queued (not started) jobs of ``trial_ids`` from the queues of ``worker_ids``
    with their payloads, and the stored ARQ results of every job of those trials: for a
    deleted study, so nothing of it runs or lingers. A job a worker already started is left
    to finish (its events are dropped by the manager). The ids of the jobs taken out of a
    queue; raises RedisUnavailable."""
    prefixes = tuple(f"trial-{tid}-" for tid in trial_ids)
    removed: list[str] = []
    if not prefixes:
        return removed
    with redis_errors(r, "removing a deleted study's jobs"):
        for worker_id in worker_ids:
            queue = keys.queue(worker_id)
            for member in await r.zrange(queue, 0, -1):
                job_id = member.decode() if isinstance(member, bytes) else str(member)
                if job_id.startswith(prefixes) and await _remove_if_not_started(
                    cast(ArqRedis, r), job_id, queue
                ):
                    removed.append(job_id)
        for prefix in prefixes:
            stale = [k async for k in r.scan_iter(match=keys.arq_result(prefix) + "*")]
            if stale:
                await r.delete(*stale)
    if removed:
        logger.info("removed %d queued job(s) of deleted trials: %s", len(removed), removed)
    return removed


def worker_settings(
    pool: ArqRedis,
    worker_id: str,
    functions: Sequence[Callable[..., Any] | Function],
    max_jobs: int,
    *,
    ctx: dict[str, Any] | None = None,
) -> Worker:
    """The ARQ ``Worker`` that runs ``worker_id``'s queue (``keys.queue(worker_id)``) on ``pool``.

    JSON (de)serializers; ``max_jobs`` jobs at once; abortable (``allow_abort_jobs``); one try
    (``max_tries=1``, ``retry_jobs=False``: a trial is placed again by the manager, never
    silently re-run); no signal handlers (the worker process owns SIGTERM); ARQ's timeout
    ``FUNCTION_TIMEOUT_S`` (the job enforces its own); results kept ``KEEP_RESULT_S``; polls every
    ``POLL_DELAY_S``. ``functions`` are coroutine functions ``f(ctx, **kwargs)``, registered by
    their ``__name__`` (closures too: name the trial one ``JOB_FUNCTION``), or
    ``arq.worker.func(...)`` results; ``ctx`` seeds ARQ's per-job context dict. Build it inside
    the running event loop, run it with ``await worker.async_run()``, stop it with
    ``close_worker(worker)`` (which closes ``pool``). Raises ValueError when ``max_jobs`` < 1 or
    ``functions`` is empty.
    """
    if max_jobs < 1:
        raise ValueError(
            f"max_jobs is {max_jobs}: a worker runs at least 1 trial at once (--max-parallel)"
        )
    if not functions:
        raise ValueError("functions is empty: register the trial function (run_trial_job)")
    registered = [f if isinstance(f, Function) else func(f, name=f.__name__) for f in functions]
    return Worker(
        functions=registered,
        queue_name=keys.queue(worker_id),
        redis_pool=pool,
        job_serializer=JSON_SERIALIZER,
        job_deserializer=JSON_DESERIALIZER,
        allow_abort_jobs=True,
        max_tries=1,
        retry_jobs=False,
        handle_signals=False,
        job_timeout=FUNCTION_TIMEOUT_S,
        keep_result=KEEP_RESULT_S,
        poll_delay=POLL_DELAY_S,
        max_jobs=max_jobs,
        ctx=ctx,
    )


async def close_worker(worker: Worker) -> None:
    """Stop an ARQ worker made by ``worker_settings`` and close its pool.

    It stops polling, cancels the jobs it runs (their functions see CancelledError; ARQ records
    them failed), waits for them, deletes its health-check key and closes the pool. Use this
    rather than ``Worker.close()``: arq 0.28 closes the pool with redis-py's deprecated
    ``close()``, a DeprecationWarning (an error under ``-W error``).
    """
    worker.allow_pick_jobs = False
    # cancel_and_wait, not gather: a cancellation swallowed inside a Redis call (cluster.tasks)
    # would otherwise keep the poll loop or a job running, and this await, forever
    if worker.main_task is not None:
        await cancel_and_wait({worker.main_task}, CLOSE_WAIT_S, grace_s=1.0)
    await cancel_and_wait(list(worker.tasks.values()), CLOSE_WAIT_S)
    with contextlib.suppress(RedisError):
        await worker.pool.delete(worker.health_check_key)
    await worker.pool.aclose()
