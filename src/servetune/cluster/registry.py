"""The worker registry in Redis: what each worker is (``WorkerInfo``), its heartbeats, its GPU
history and the alias a user gave it; online, busy or offline is read from the heartbeat's TTL.

A worker calls ``register`` once and ``beat`` every ``settings.heartbeat_s``; the manager reads.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import Any, Literal, cast

import redis
import redis.asyncio
import redis.asyncio.client
import redis.client
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from servetune.cluster import keys
from servetune.cluster.models import GpuSample, Heartbeat, UtcDatetime, WorkerInfo, check_alias
from servetune.cluster.redis import redis_errors
from servetune.errors import WorkerAliasTaken, WorkerNotFound
from servetune.settings import Settings

__all__ = ["MISSED_BEATS", "Registry", "WorkerState", "WorkerStatus"]

logger = logging.getLogger(__name__)

MISSED_BEATS = 3
"""A worker is offline once this many heartbeats in a row did not arrive (the heartbeat TTL)."""

WorkerState = Literal["online", "busy", "offline"]
"""online: heartbeats arrive, no trial running; busy: online with ≥ 1 trial; offline: silent."""


class WorkerStatus(BaseModel):
    """A registered worker as the manager sees it now."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    info: WorkerInfo = Field(
        description="What the worker said at registration; alias = the user's alias if one was "
        "set (PATCH), else the worker's own --name."
    )
    state: WorkerState = Field(
        description="online (heartbeats arrive), busy (online with ≥ 1 trial running) or "
        f"offline (no heartbeat for {MISSED_BEATS} periods)."
    )
    last_heartbeat: Heartbeat | None = Field(
        default=None, description="Its latest heartbeat while online; None when offline."
    )
    last_seen_at: UtcDatetime | None = Field(
        default=None, description="When its last heartbeat arrived (UTC), kept while offline."
    )


def _decode(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else value


class Registry:
    """Workers in Redis (keys in ``cluster/keys.py``).

    ``register(info)`` stores the info (no expiry) and adds the id to ``keys.WORKERS``;
    ``beat(hb)`` refreshes the heartbeat key (TTL ``MISSED_BEATS`` × ``settings.heartbeat_s``),
    prepends a GPU sample (capped at ``settings.gpu_history_len``, newest first) and stores the
    info again if Redis lost it (restarted without data). Readers: ``workers``, ``worker``,
    ``gpu_history``; a user's alias: ``set_alias``; ``forget`` removes a worker. Every method
    raises RedisUnavailable when Redis cannot be used (after the client's retries).
    """

    def __init__(self, r: redis.asyncio.Redis, settings: Settings) -> None:
        self.r = r
        self.settings = settings
        self._registered: dict[str, WorkerInfo] = {}

    @property
    def heartbeat_ttl_ms(self) -> int:
        """How long a heartbeat keeps a worker online, ms (``MISSED_BEATS`` periods)."""
        return max(1, math.ceil(MISSED_BEATS * self.settings.heartbeat_s * 1000))

    async def register(self, info: WorkerInfo) -> None:
        """Store ``info`` under ``keys.worker_info`` and add the worker to ``keys.WORKERS``;
        remembered so ``beat`` can store it again after a Redis restart."""
        self._registered[info.id] = info
        with redis_errors(self.r, f"registering worker {info.id}"):
            async with self.r.pipeline(transaction=True) as pipe:
                pipe.set(keys.worker_info(info.id), info.model_dump_json())
                pipe.sadd(keys.WORKERS, info.id)
                await pipe.execute()
        logger.info("registered worker %s (%s)", info.id, info.alias or info.hostname)

    async def beat(self, hb: Heartbeat) -> bool:
        """Record heartbeat ``hb`` of a worker; True when its info had to be stored again.

        In one transaction: SET the heartbeat (expires after ``heartbeat_ttl_ms``), LPUSH a
        ``GpuSample`` and LTRIM to ``settings.gpu_history_len`` (only when ``hb.gpus`` is not
        empty), SADD ``keys.WORKERS``, the last-seen time, and SET NX the info given to
        ``register`` (a no-op unless Redis lost it). Raises RedisUnavailable.
        """
        with redis_errors(self.r, f"recording a heartbeat of worker {hb.worker_id}"):
            async with self.r.pipeline(transaction=True) as pipe:
                restoring = self._queue_beat(pipe, hb)
                replies = await pipe.execute()
        return self._beat_recorded(hb, replies, restoring)

    def beat_sync(self, client: redis.Redis, hb: Heartbeat) -> bool:
        """``beat`` through the synchronous client ``client`` (same keys, TTL and transaction),
        for a heartbeat thread that must not wait for the worker's event loop.

        ``client`` must talk to the same Redis as the registry's own (``connect_sync`` on the
        same URL). Safe to call from another thread than the one running the event loop.
        Returns True when the info had to be stored again. Raises RedisUnavailable.
        """
        doing = f"recording a heartbeat of worker {hb.worker_id}"
        with redis_errors(client, doing), client.pipeline(transaction=True) as pipe:
            restoring = self._queue_beat(pipe, hb)
            replies = pipe.execute()
        return self._beat_recorded(hb, replies, restoring)

    def _queue_beat(
        self, pipe: redis.client.Pipeline | redis.asyncio.client.Pipeline, hb: Heartbeat
    ) -> bool:
        """Queue the commands of one heartbeat on ``pipe`` (sync or asyncio: queuing does not
        wait). True when the last one is the SET NX of the info (the worker registered here)."""
        info = self._registered.get(hb.worker_id)
        pipe.set(keys.heartbeat(hb.worker_id), hb.model_dump_json(), px=self.heartbeat_ttl_ms)
        if hb.gpus:
            sample = GpuSample(at=hb.sent_at, gpus=hb.gpus)
            history = keys.gpu_history(hb.worker_id)
            pipe.lpush(history, sample.model_dump_json())
            pipe.ltrim(history, 0, self.settings.gpu_history_len - 1)
        pipe.sadd(keys.WORKERS, hb.worker_id)
        pipe.zadd(keys.WORKERS_SEEN, {hb.worker_id: hb.sent_at.timestamp()})
        if info is not None:
            pipe.set(keys.worker_info(hb.worker_id), info.model_dump_json(), nx=True)
        return info is not None

    @staticmethod
    def _beat_recorded(hb: Heartbeat, replies: list[Any], restoring: bool) -> bool:
        restored = restoring and bool(replies[-1])
        if restored:
            logger.warning(
                "worker %s's registration was missing (Redis restarted without its data?): "
                "registered it again",
                hb.worker_id,
            )
        return restored

    async def mark_offline(self, worker_id: str) -> None:
        """Drop the worker's heartbeat so it shows offline at once (a worker that stops cleanly).
        Raises RedisUnavailable."""
        with redis_errors(self.r, f"marking worker {worker_id} offline"):
            await self.r.delete(keys.heartbeat(worker_id))

    async def _statuses(self, ids: list[str]) -> list[WorkerStatus]:
        if not ids:
            return []
        async with self.r.pipeline(transaction=False) as pipe:
            for worker_id in ids:
                pipe.get(keys.worker_info(worker_id))
                pipe.get(keys.heartbeat(worker_id))
                pipe.get(keys.worker_alias(worker_id))
                pipe.zscore(keys.WORKERS_SEEN, worker_id)
            replies = await pipe.execute()
        statuses = []
        for n, worker_id in enumerate(ids):
            raw_info, raw_hb, raw_alias, seen_s = replies[4 * n : 4 * n + 4]
            status = self._status(worker_id, raw_info, raw_hb, _decode(raw_alias), seen_s)
            if status is not None:
                statuses.append(status)
        return statuses

    def _status(
        self,
        worker_id: str,
        raw_info: bytes | None,
        raw_hb: bytes | None,
        alias: str | None,
        seen_s: float | None,
    ) -> WorkerStatus | None:
        if raw_info is None:
            logger.debug("worker %s is listed but has no info (yet): left out", worker_id)
            return None
        try:
            info = WorkerInfo.model_validate_json(raw_info)
        except ValidationError as e:
            logger.error("worker %s's stored info does not parse (left out): %s", worker_id, e)
            return None
        if alias is not None:
            info = info.model_copy(update={"alias": alias})
        heartbeat = None
        if raw_hb is not None:
            try:
                heartbeat = Heartbeat.model_validate_json(raw_hb)
            except ValidationError as e:
                logger.error(
                    "worker %s's heartbeat does not parse (seen offline): %s", worker_id, e
                )
        state: WorkerState = "offline"
        if heartbeat is not None:
            state = "busy" if heartbeat.running else "online"
        last_seen = datetime.fromtimestamp(seen_s, UTC) if seen_s is not None else None
        return WorkerStatus(
            info=info, state=state, last_heartbeat=heartbeat, last_seen_at=last_seen
        )

    async def workers(self) -> list[WorkerStatus]:
        """Every registered worker, offline ones included, sorted by alias (or host name), id.
        Raises RedisUnavailable."""
        with redis_errors(self.r, "listing workers"):
            members = await cast(Awaitable[set[bytes]], self.r.smembers(keys.WORKERS))
            statuses = await self._statuses(sorted(_decode(m) or "" for m in members))
        return sorted(
            statuses, key=lambda s: ((s.info.alias or s.info.hostname).lower(), s.info.id)
        )

    async def worker(self, worker_id: str) -> WorkerStatus | None:
        """The worker ``worker_id``, or None when it is not registered. Raises RedisUnavailable."""
        with redis_errors(self.r, f"reading worker {worker_id}"):
            if not await cast(Awaitable[int], self.r.sismember(keys.WORKERS, worker_id)):
                return None
            statuses = await self._statuses([worker_id])
        return statuses[0] if statuses else None

    async def gpu_history(self, worker_id: str, limit: int) -> list[GpuSample]:
        """The worker's last ``limit`` GPU samples, newest first ([] for a worker without GPUs or
        unknown). Raises ValueError when ``limit`` < 1, RedisUnavailable."""
        if limit < 1:
            raise ValueError(f"limit is {limit}: ask for at least 1 GPU sample")
        with redis_errors(self.r, f"reading worker {worker_id}'s GPU history"):
            raw = await cast(
                Awaitable[list[bytes]], self.r.lrange(keys.gpu_history(worker_id), 0, limit - 1)
            )
        samples = []
        for item in raw:
            try:
                samples.append(GpuSample.model_validate_json(item))
            except ValidationError as e:
                logger.error("a GPU sample of worker %s does not parse (skipped): %s", worker_id, e)
        return samples

    async def set_alias(self, worker_id: str, alias: str | None) -> WorkerStatus:
        """Give worker ``worker_id`` the alias ``alias`` (None clears it, back to the worker's
        own ``--name``); kept in ``keys.worker_alias``, so it outlives re-registration.

        Raises WorkerNotFound for an unknown worker, ValueError when ``alias`` breaks the rule
        of ``check_alias`` (1-100 printable characters, no space at either end),
        WorkerAliasTaken when another known worker is called so (case-insensitively),
        RedisUnavailable.
        """
        alias = check_alias(alias)
        status = await self.worker(worker_id)
        if status is None:
            raise WorkerNotFound(
                f"no worker {worker_id!r} is registered; GET /api/workers lists the ids"
            )
        if alias is not None:
            for other in await self.workers():
                taken = other.info.alias
                if other.info.id != worker_id and taken and taken.casefold() == alias.casefold():
                    raise WorkerAliasTaken(
                        f"alias {alias!r} is taken by worker {other.info.id}; choose another "
                        "(or rename that worker first)"
                    )
        with redis_errors(self.r, f"renaming worker {worker_id}"):
            if alias:
                await self.r.set(keys.worker_alias(worker_id), alias)
            else:
                await self.r.delete(keys.worker_alias(worker_id))
        logger.info("worker %s is now called %r", worker_id, alias)
        updated = await self.worker(worker_id)
        if updated is None:  # forgotten meanwhile
            raise WorkerNotFound(f"worker {worker_id!r} was removed while it was being renamed")
        return updated

    async def forget(self, worker_id: str) -> None:
        """Remove every trace of worker ``worker_id`` (info, heartbeat, GPU history, alias).

        A worker still running comes back with its next heartbeat. Raises RedisUnavailable.
        """
        self._registered.pop(worker_id, None)
        with redis_errors(self.r, f"forgetting worker {worker_id}"):
            async with self.r.pipeline(transaction=True) as pipe:
                pipe.srem(keys.WORKERS, worker_id)
                pipe.zrem(keys.WORKERS_SEEN, worker_id)
                pipe.delete(
                    keys.worker_info(worker_id),
                    keys.heartbeat(worker_id),
                    keys.gpu_history(worker_id),
                    keys.worker_alias(worker_id),
                )
                await pipe.execute()
        logger.info("forgot worker %s", worker_id)
