"""The trial events stream: workers append ``TrialEvent`` entries; managers read them through one
consumer group and acknowledge each entry only after their database commit (nothing is lost).

Also the live pub/sub channel of a study (views that may miss a message).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import redis.asyncio
from pydantic import ValidationError
from redis.exceptions import ResponseError

from servetune.cluster import keys
from servetune.cluster.models import TrialEvent
from servetune.cluster.redis import SOCKET_TIMEOUT_S, redis_errors

__all__ = ["EventEntry", "EventReader", "publish_study", "send_event"]

logger = logging.getLogger(__name__)

EventEntry = tuple[str, TrialEvent | None, bytes]
"""One stream entry: (entry id, the event or None when it does not parse, the raw JSON bytes)."""

_FIELD = b"event"


async def send_event(r: redis.asyncio.Redis, event: TrialEvent) -> str:
    """Append ``event`` to ``keys.EVENTS`` (field ``event`` = its JSON; the stream is capped near
    ``keys.EVENTS_MAXLEN``); the entry id. Raises RedisUnavailable."""
    with redis_errors(r, f"sending the {event.kind.value} event of trial {event.trial_id}"):
        entry_id = await r.xadd(
            keys.EVENTS,
            {_FIELD: event.model_dump_json().encode()},
            maxlen=keys.EVENTS_MAXLEN,
            approximate=True,
        )
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


def _decode_id(entry_id: Any) -> str:
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


def _parse(entry_id: Any, fields: dict[bytes, bytes] | None) -> EventEntry:
    """An entry as (id, event or None, raw bytes); a broken or trimmed one is logged."""
    eid = _decode_id(entry_id)
    raw = (fields or {}).get(_FIELD)
    if raw is None:
        logger.error(
            "events entry %s has no %r field (trimmed from the stream, or not written by a "
            "servetune worker): skipped",
            eid,
            _FIELD.decode(),
        )
        return eid, None, b""
    try:
        return eid, TrialEvent.model_validate_json(raw), raw
    except ValidationError as e:
        logger.error(
            "events entry %s is not a valid TrialEvent (%d problems: %s); raw %r",
            eid,
            e.error_count(),
            "; ".join(f"{'.'.join(map(str, p['loc']))}: {p['msg']}" for p in e.errors()[:3]),
            raw[:200],
        )
        return eid, None, raw


class EventReader:
    """Reads ``keys.EVENTS`` as consumer ``consumer`` of the group ``keys.EVENTS_GROUP``.

    ``read`` first hands back this consumer's pending entries (delivered before, never
    acknowledged: e.g. read before the manager was killed), then new ones. It creates the group
    (from the stream's start, so events written before any manager existed are read) and creates
    it again when Redis lost it (NOGROUP after a restart). Acknowledge each entry with ``ack``
    once it is safely stored; ``claim_stale`` takes over entries of consumers that stopped.
    """

    def __init__(self, r: redis.asyncio.Redis, consumer: str) -> None:
        if not consumer:
            raise ValueError(
                "consumer is empty: name the manager reading the events (e.g. host:pid)"
            )
        self.r = r
        self.consumer = consumer
        self._group_ready = False
        self._pending_after: str | None = "0"

    async def _create_group(self) -> None:
        try:
            await self.r.xgroup_create(keys.EVENTS, keys.EVENTS_GROUP, id="0", mkstream=True)
            logger.info("created consumer group %s on %s", keys.EVENTS_GROUP, keys.EVENTS)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._group_ready = True

    async def _with_group(self, call: Any) -> Any:
        """Run ``call()``; on NOGROUP (Redis restarted and lost the group) create it, run again."""
        if not self._group_ready:
            await self._create_group()
        try:
            return await call()
        except ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            logger.warning(
                "consumer group %s is gone (Redis restarted without its data?): creating it again",
                keys.EVENTS_GROUP,
            )
            self._group_ready = False
            self._pending_after = "0"
            await self._create_group()
            return await call()

    async def _read_pending(self, count: int) -> list[EventEntry]:
        assert self._pending_after is not None
        reply = await self.r.xreadgroup(
            keys.EVENTS_GROUP, self.consumer, {keys.EVENTS: self._pending_after}, count=count
        )
        entries = reply[0][1] if reply else []
        if not entries:
            return []
        self._pending_after = _decode_id(entries[-1][0])
        return [_parse(eid, fields) for eid, fields in entries]

    async def _read_new(self, block_ms: int, count: int) -> list[EventEntry]:
        block = block_ms if block_ms > 0 else None
        reply = await self.r.xreadgroup(
            keys.EVENTS_GROUP, self.consumer, {keys.EVENTS: ">"}, count=count, block=block
        )
        entries = reply[0][1] if reply else []
        return [_parse(eid, fields) for eid, fields in entries]

    async def read(self, block_ms: int = 1000, count: int = 100) -> list[EventEntry]:
        """Up to ``count`` entries: this consumer's pending ones first (after a (re)start), then
        new ones, waiting up to ``block_ms`` ms for some (≤ 0: no wait); [] when none came.

        An entry that does not parse as a TrialEvent comes as ``(id, None, raw)`` and is logged
        (acknowledge it too, or it stays pending). Raises RedisUnavailable (after the client's
        retries); ValueError when ``block_ms`` or ``count`` is out of range.
        """
        if block_ms >= SOCKET_TIMEOUT_S * 1000:
            raise ValueError(
                f"block_ms is {block_ms}: it must stay below the client's socket timeout "
                f"({SOCKET_TIMEOUT_S * 1000:.0f} ms); poll more often instead"
            )
        if count < 1:
            raise ValueError(f"count is {count}: read at least 1 entry")
        with redis_errors(self.r, "reading trial events"):
            if self._pending_after is not None:
                pending = await self._with_group(lambda: self._read_pending(count))
                if pending:
                    return list(pending)
                self._pending_after = None
            return list(await self._with_group(lambda: self._read_new(block_ms, count)))

    async def ack(self, entry_id: str) -> None:
        """Acknowledge entry ``entry_id`` (call after its database commit): it is never handed
        out again. Acknowledging twice, or after Redis lost the stream, is harmless.
        Raises RedisUnavailable."""
        with redis_errors(self.r, f"acknowledging event {entry_id}"):
            await self.r.xack(keys.EVENTS, keys.EVENTS_GROUP, entry_id)

    async def claim_stale(self, min_idle_ms: int) -> list[EventEntry]:
        """Take over every entry delivered to some consumer (e.g. a manager that died) and not
        acknowledged for at least ``min_idle_ms`` ms (XAUTOCLAIM); they come back parsed as
        ``read`` gives them and are now this consumer's pending entries.

        This consumer's own entries idle that long are included too: keep ``min_idle_ms`` well
        above the time an entry takes to store (e.g. 60 000). Raises RedisUnavailable.
        """
        if min_idle_ms < 0:
            raise ValueError(f"min_idle_ms is {min_idle_ms}: use 0 or more")
        claimed: list[EventEntry] = []

        async def claim_all() -> None:
            cursor: Any = "0-0"
            while True:
                reply = await self.r.xautoclaim(
                    keys.EVENTS,
                    keys.EVENTS_GROUP,
                    self.consumer,
                    min_idle_time=min_idle_ms,
                    start_id=cursor,
                    count=100,
                )
                cursor, entries = reply[0], reply[1]
                claimed.extend(_parse(eid, fields) for eid, fields in entries if eid is not None)
                if _decode_id(cursor) == "0-0":
                    return

        with redis_errors(self.r, "claiming stale trial events"):
            await self._with_group(claim_all)
        if claimed:
            logger.warning(
                "took over %d unacknowledged events idle ≥ %d ms from other consumers",
                len(claimed),
                min_idle_ms,
            )
        return claimed


async def publish_study(r: redis.asyncio.Redis, study_id: int, payload: dict[str, Any]) -> None:
    """Publish ``payload`` (a JSON object) on ``keys.study_live(study_id)`` for live views.

    Pub/sub: a subscriber that is not listening misses it; never use it for what must arrive.
    Raises TypeError/ValueError when ``payload`` is not plain JSON, RedisUnavailable.
    """
    message = json.dumps(payload, allow_nan=False, separators=(",", ":"))
    with redis_errors(r, f"publishing a live update of study {study_id}"):
        await r.publish(keys.study_live(study_id), message)
